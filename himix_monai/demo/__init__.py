"""
Synthetic chest-CT demo datasets, generated on first use so that the bundle trains and tests on a fresh machine:
single slices (:py:mod:`.slices`) and volumes (:py:mod:`.volumes`), each case with a report written from its mask
(:py:mod:`himix_monai.mask_reports`). Kept apart from :py:mod:`himix_monai.data`, which reads users' files.
"""

from .slices import ensure_demo_dataset, generate_demo_dataset
from .volumes import ensure_volume_demo_dataset, generate_volume_demo_dataset

__all__ = ["ensure_demo_dataset", "ensure_volume_demo_dataset", "generate_demo_dataset", "generate_volume_demo_dataset"]
