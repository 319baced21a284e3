"""Seeding a run, with cuDNN's deterministic mode only when it is asked for.

MONAI's :py:func:`monai.utils.set_determinism` always sets ``torch.backends.cudnn.deterministic = True`` and
``benchmark = False`` when a seed is given, whatever ``use_deterministic_algorithms`` says: every GPU run then
uses slower convolution algorithms. :py:func:`seed_run` calls it and then sets cuDNN as asked; with
determinism asked for it also sets ``CUBLAS_WORKSPACE_CONFIG`` first, as deterministic cuBLAS needs it before
the first cuBLAS call.
"""

from __future__ import annotations

import os

import torch
from monai.utils import set_determinism

__all__ = ["seed_run"]


def seed_run(seed: int | None, deterministic_algorithms: bool = False) -> None:
    """Seed Python, NumPy and torch; make GPU kernels deterministic only when ``deterministic_algorithms``.

    Args:
        seed: the seed; None unseeds (as MONAI's ``set_determinism(seed=None)``).
        deterministic_algorithms: True for ``torch.use_deterministic_algorithms(True)``, cuDNN's deterministic
            mode and a fixed cuBLAS workspace (bit-identical GPU runs, slower); False for cuDNN's benchmark
            mode (fastest algorithms for fixed input sizes, results not bit-identical between runs).

    Examples::

        >>> seed_run(0, deterministic_algorithms=False)
        >>> torch.backends.cudnn.benchmark
        True
    """
    if deterministic_algorithms:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_determinism(seed=seed, use_deterministic_algorithms=True if deterministic_algorithms else None)
    torch.backends.cudnn.deterministic = bool(deterministic_algorithms)
    torch.backends.cudnn.benchmark = not deterministic_algorithms
