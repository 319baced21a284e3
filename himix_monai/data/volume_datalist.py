"""
Datalists of CT volumes for 2.5D training (``volume_data``): items whose ``image`` is a NIfTI volume or a DICOM
series folder and whose ``label`` is a NIfTI label volume, with one ``text`` (report) per volume.

The 2-D loader (:py:func:`himix_monai.data.datalist.load_checked_datalist`) refuses volumes on purpose (a 2-D model
needs slices); this one reads the same JSON schema (validated by :py:func:`~himix_monai.data.datalist.load_datalist`)
and checks what a volume training needs, from the file headers only: the image is a volume (a NIfTI file with at
least 2 slices, or a folder of DICOM files), the label a NIfTI volume of the same size (for a DICOM series: as many
slices as the folder has files). Every slice of a volume is trained with the volume's report; per-slice reports
(``slice_texts``) are not supported and stop with an error rather than being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from himix_monai.data.datalist import load_datalist
from himix_monai.errors import DatalistError

__all__ = ["load_volume_datalist", "volume_problem"]

_NIFTI = (".nii", ".nii.gz")
_MAX_LISTED = 10


def _nifti_shape(path: Path) -> tuple[int, ...]:
    import nibabel

    shape = tuple(int(s) for s in nibabel.load(str(path)).shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def volume_problem(image: str | os.PathLike, label: str | os.PathLike) -> str | None:
    """What keeps an image/label pair from being a training volume, or None when it is one.

    Args:
        image: a NIfTI volume or a DICOM series folder.
        label: a NIfTI label volume.
    """
    image, label = Path(image), Path(label)
    if not image.exists():
        return f"image {image} not found"
    if not label.is_file():
        return f"label {label} not found"
    if not label.name.lower().endswith(_NIFTI):
        return f"label {label} must be a NIfTI label volume (.nii or .nii.gz)"
    try:
        label_shape = _nifti_shape(label)
    except Exception as err:  # nibabel raises several types for a bad file
        return f"label {label} cannot be read: {err}"
    if image.is_dir():
        count = len(_dicom_files(image))
        if count < 2:
            return f"image {image} is a folder with {count} file(s), not a DICOM series of at least 2 slices"
        if len(label_shape) != 3 or label_shape[-1] != count:
            return f"label {label} has shape {label_shape}, but the DICOM series {image} has {count} slices"
        return None
    if not image.name.lower().endswith(_NIFTI):
        return f"image {image} is not a NIfTI volume or a DICOM series folder (2-D pictures need context_slices=0)"
    try:
        image_shape = _nifti_shape(image)
    except Exception as err:
        return f"image {image} cannot be read: {err}"
    if len(image_shape) != 3 or image_shape[-1] < 2:
        return f"image {image} has shape {image_shape}; a volume of at least 2 slices is expected"
    if label_shape != image_shape:
        return f"label {label} has shape {label_shape}, image {image} has {image_shape}"
    return None


def load_volume_datalist(
    path: str | os.PathLike,
    split: str = "training",
    check_files: Any = True,
    image_key: str = "image",
    base_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Load one split of a datalist of volumes and check its pairs (headers only) before training starts.

    Args:
        path: the datalist JSON file.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        check_files: check every pair with :py:func:`volume_problem` (booleans given as text are read as such).
        image_key: the item key that holds the image: ``"image"``, or e.g. ``"image_dicom"`` (the DICOM series of
            the volume demo); its value becomes the item's ``image``.
        base_dir: the folder relative paths are resolved against (default: the datalist's folder).

    Returns:
        Items ``{"image", "label", "text"}`` (other keys dropped).

    Raises:
        DatalistError: naming the datalist, split, item number and file, for missing or mismatched files, for
            items without ``image_key`` and for per-slice reports (``slice_texts``), which are not supported.

    Examples::

        items = load_volume_datalist("data/demo_volumes/datalist.json", "training", image_key="image_dicom")
    """
    from himix_monai.config_utils import as_bool

    items = load_datalist(path, split=split, base_dir=base_dir)
    base = Path(base_dir) if base_dir is not None else Path(path).absolute().parent
    result, problems = [], []
    for number, item in enumerate(items, start=1):
        if "slice_texts" in item:
            raise DatalistError(
                f"{path}: item {number} of {split!r} has 'slice_texts'; per-slice reports are not supported yet: "
                "every slice of a volume is trained with the volume's 'text'. Remove 'slice_texts'."
            )
        if image_key not in item:
            raise DatalistError(f"{path}: item {number} of {split!r} has no {image_key!r} (volume_image_key)")
        image = Path(item[image_key])
        image = image if image.is_absolute() else base / image
        entry = {"image": str(image), "label": item["label"], "text": item["text"]}
        if as_bool(check_files, "check_data_files"):
            problem = volume_problem(entry["image"], entry["label"])
            if problem is not None:
                problems.append(f"item {number}: {problem}")
        result.append(entry)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED]) + (" ..." if len(problems) > _MAX_LISTED else "")
        raise DatalistError(f"{path}: {len(problems)} of {len(items)} {split!r} volumes cannot be used: {listed}")
    return result
