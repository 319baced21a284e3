"""
Structured lesion reports derived from binary masks, in the style of the published text annotations.

The QaTa-COV19 and MosMedData+ annotations (LViT, Li et al.) describe whether one or both lungs are
infected, how many infected areas there are and roughly where they are::

    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."

The Kvasir-SEG annotations describe the number, size and position of the polyps::

    "one small polyp located in right of the image"

This module writes such reports from a mask, deterministically, so that datasets without text (or
synthetic ones, see :py:mod:`himix_monai.data.demo`) can be used for text-guided segmentation:

- :py:func:`find_lesions` counts lesions as 8-connected components of at least ``min_size`` pixels;
- :py:func:`chest_report` (QaTa/MosMed style) and :py:func:`generic_report` (Kvasir style) write the text;
- :py:func:`read_mask` reads a mask file (PNG/JPEG/TIFF/BMP, DICOM, NIfTI, NumPy) in display orientation;
- :py:func:`fill_datalist_reports` and :py:func:`mask_folder_reports` apply them to a datalist or a folder
  (used by the ``python -m data_prep.reports`` command line tool).

Orientation conventions. All report functions take a 2-D mask in *display orientation*: ``mask[row, column]``
with rows running from the top of the image to the bottom and columns from the image left to the image right,
i.e. the array of a PNG read with PIL or the ``pixel_array`` of a DICOM file. Chest images follow the
radiological convention: the patient's RIGHT lung is on the IMAGE LEFT, so a lesion in the image left half is
reported in the "right lung". (MONAI's readers return the transpose of the display array, see
:py:func:`himix_monai.data.ct.radiological_view`.)
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from himix_monai.files import DICOM_EXTENSIONS, NIFTI_EXTENSIONS, PICTURE_EXTENSIONS, write_text_atomically

__all__ = [
    "REPORT_STYLES",
    "DEFAULT_MIN_SIZE",
    "DEFAULT_MIN_ZONE_FRACTION",
    "DEFAULT_SIZE_THRESHOLDS",
    "LUNG_SIDES",
    "LUNG_ZONES",
    "NO_CHEST_FINDING",
    "Lesion",
    "ChestFindings",
    "count_word",
    "binarize_mask",
    "resolve_min_size",
    "find_lesions",
    "describe_chest_findings",
    "format_chest_report",
    "chest_report",
    "lesion_position",
    "lesion_size_word",
    "generic_report",
    "report_from_mask",
    "read_mask",
    "fill_datalist_reports",
    "mask_folder_reports",
    "write_reports_csv",
]

REPORT_STYLES: tuple[str, ...] = ("chest", "generic")
"""The report styles: ``"chest"`` (QaTa-COV19/MosMedData+) and ``"generic"`` (Kvasir-SEG)."""

DEFAULT_MIN_SIZE: float = 0.001
"""Components smaller than this are ignored: 0.1 % of the image (16 pixels at 128 x 128, 262 at 512 x 512)."""

DEFAULT_MIN_ZONE_FRACTION: float = 0.1
"""A lesion is reported in every lung zone holding at least this fraction of its pixels (and in its main zone)."""

DEFAULT_SIZE_THRESHOLDS: tuple[float, float] = (0.05, 0.15)
"""Generic style size words by area fraction of the image: small < 5 % <= medium < 15 % <= large."""

LUNG_SIDES: tuple[str, ...] = ("left", "right")
"""The patient sides in report order (the published reports name the left lung first)."""

LUNG_ZONES: tuple[str, ...] = ("upper", "middle", "lower")
"""The lung zones, top to bottom: thirds of the lung field's vertical extent."""

NO_CHEST_FINDING = "No pulmonary infection."
"""The chest report of a mask without lesions."""

_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class Lesion:
    """One connected lesion of a mask.

    Args:
        rows: row index of each of its pixels.
        columns: column index of each of its pixels.
        area: number of pixels.
        centroid: (row, column) centre of mass.
    """

    rows: np.ndarray = field(repr=False)
    columns: np.ndarray = field(repr=False)
    area: int
    centroid: tuple[float, float]


@dataclass(frozen=True)
class ChestFindings:
    """What a chest report says: the number of infected areas and the involved zones of each lung.

    Args:
        count: number of infected areas (connected lesions).
        zones: for each patient side (``"left"``/``"right"``) the involved zones, ordered top to bottom.
    """

    count: int
    zones: Mapping[str, tuple[str, ...]]

    @property
    def sides(self) -> tuple[str, ...]:
        """The infected lungs, in report order."""
        return tuple(side for side in LUNG_SIDES if self.zones.get(side))


def count_word(count: int) -> str:
    """The English word for ``count`` up to ten, digits above.

    Args:
        count: a non-negative integer.

    Examples::

        >>> count_word(2), count_word(12)
        ('two', '12')
    """
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    return _COUNT_WORDS[count] if count < len(_COUNT_WORDS) else str(count)


def binarize_mask(mask: Any) -> np.ndarray:
    """Foreground of a mask as a boolean array.

    The threshold of :py:class:`himix_monai.transforms.BinarizeMask` (``"auto"``): 8-bit style masks (maximum
    above 127, e.g. 0/255 PNGs) are foreground above 127; other masks (0/1 labels, probabilities) above 0.5.
    Boolean masks are returned as they are; the shape is kept.

    Args:
        mask: array-like mask (NumPy array, torch tensor, nested lists).
    """
    array = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
    if array.dtype == bool:
        return array.copy()
    if array.size == 0:
        return np.zeros(array.shape, dtype=bool)
    from himix_monai.transforms.mask import BinarizeMask  # the one threshold rule (import here: transforms import data)

    return array > BinarizeMask().resolve_threshold(torch.as_tensor(array.max()))


def resolve_min_size(min_size: float, num_pixels: int) -> int:
    """The minimum lesion size in pixels.

    Args:
        min_size: pixels when >= 1, a fraction of the image when in [0, 1).
        num_pixels: number of pixels of the image.
    """
    if not math.isfinite(min_size) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative number of pixels or a fraction < 1, got {min_size}")
    if min_size < 1:
        return max(1, math.ceil(min_size * num_pixels))
    return int(math.ceil(min_size))


def _as_2d(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    squeezed = np.squeeze(mask)
    if squeezed.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got shape {tuple(mask.shape)}")
    return squeezed


def find_lesions(mask: Any, min_size: float = DEFAULT_MIN_SIZE) -> list[Lesion]:
    """The lesions of a mask: 8-connected foreground components of at least ``min_size`` pixels.

    Args:
        mask: 2-D mask (singleton dimensions are squeezed), binarized with :py:func:`binarize_mask`.
        min_size: minimum size in pixels (>= 1) or as a fraction of the image (< 1).

    Returns:
        The lesions in raster order of their first pixel.
    """
    from skimage.measure import label, regionprops

    foreground = _as_2d(binarize_mask(mask))
    minimum = resolve_min_size(min_size, foreground.size)
    lesions = []
    for region in regionprops(label(foreground, connectivity=2)):
        if region.area < minimum:
            continue
        rows, columns = region.coords[:, 0], region.coords[:, 1]
        centroid = (float(rows.mean()), float(columns.mean()))
        lesions.append(Lesion(rows=rows, columns=columns, area=int(rows.size), centroid=centroid))
    return lesions


def _lung_field(shape: tuple[int, int], lung_mask: Any | None) -> tuple[float, float, float]:
    """(top, height, midline column) of the lung field: the lung mask's bounding box, else the image."""
    if lung_mask is not None:
        lungs = _as_2d(binarize_mask(lung_mask), "lung_mask")
        if lungs.shape != shape:
            raise ValueError(f"lung_mask shape {lungs.shape} differs from the mask shape {shape}")
        rows, columns = np.nonzero(lungs)
        if rows.size:
            top, bottom = rows.min(), rows.max() + 1
            left, right = columns.min(), columns.max() + 1
            return float(top), float(bottom - top), (left + right) / 2.0
    return 0.0, float(shape[0]), shape[1] / 2.0


def describe_chest_findings(
    mask: Any,
    lung_mask: Any | None = None,
    min_size: float = DEFAULT_MIN_SIZE,
    min_zone_fraction: float = DEFAULT_MIN_ZONE_FRACTION,
) -> ChestFindings:
    """The lesion count and involved lung zones of a chest mask.

    The image is split into the two lungs at the vertical midline of the lung field (radiological
    convention: image left = patient right) and each lung into upper/middle/lower thirds of the lung
    field's vertical extent. The lung field is the bounding box of ``lung_mask`` when given, else the image.
    A lesion involves its main zone and every other zone holding at least ``min_zone_fraction`` of its pixels;
    a lesion crossing the midline involves both lungs.

    Args:
        mask: 2-D lesion mask in display orientation.
        lung_mask: optional 2-D lung mask in display orientation, same shape as ``mask``.
        min_size: minimum lesion size in pixels (>= 1) or as a fraction of the image (< 1).
        min_zone_fraction: fraction of a lesion's pixels that makes a zone count as involved.
    """
    foreground = _as_2d(binarize_mask(mask))
    lesions = find_lesions(foreground, min_size)
    top, height, midline = _lung_field(foreground.shape, lung_mask)
    involved: dict[str, set[int]] = {side: set() for side in LUNG_SIDES}
    for lesion in lesions:
        zone = np.clip(np.floor((lesion.rows + 0.5 - top) / height * 3), 0, 2).astype(int)
        side = np.where(lesion.columns + 0.5 < midline, 1, 0)  # image left -> patient right (index 1)
        cells = np.bincount(side * 3 + zone, minlength=6)
        chosen = cells >= min_zone_fraction * lesion.area
        chosen[int(np.argmax(cells))] = True
        for cell in np.flatnonzero(chosen & (cells > 0)):
            involved[LUNG_SIDES[cell // 3]].add(int(cell % 3))
    zones = {side: tuple(LUNG_ZONES[index] for index in sorted(involved[side])) for side in LUNG_SIDES}
    return ChestFindings(count=len(lesions), zones=zones)


def _zone_phrase(zones: Sequence[str], side: str) -> str:
    words = "all" if len(zones) == len(LUNG_ZONES) else " ".join(zones)
    return f"{words} {side} lung"


def format_chest_report(findings: ChestFindings) -> str:
    """The QaTa-COV19/MosMedData+ style sentence for ``findings``.

    Examples::

        >>> format_chest_report(ChestFindings(2, {"left": ("upper",), "right": ("lower",)}))
        'Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.'
    """
    sides = findings.sides
    if findings.count == 0 or not sides:
        return NO_CHEST_FINDING
    extent = "Bilateral" if len(sides) == 2 else "Unilateral"
    areas = "infected area" if findings.count == 1 else "infected areas"
    locations = " and ".join(_zone_phrase(findings.zones[side], side) for side in sides)
    return f"{extent} pulmonary infection, {count_word(findings.count)} {areas}, {locations}."


def chest_report(
    mask: Any,
    lung_mask: Any | None = None,
    min_size: float = DEFAULT_MIN_SIZE,
    min_zone_fraction: float = DEFAULT_MIN_ZONE_FRACTION,
) -> str:
    """A QaTa-COV19/MosMedData+ style report of a chest lesion mask.

    See :py:func:`describe_chest_findings` for how lesions, lungs and zones are found.

    Args:
        mask: 2-D lesion mask in display orientation (image left = patient right).
        lung_mask: optional lung mask defining the lung field, same shape as ``mask``.
        min_size: minimum lesion size in pixels (>= 1) or as a fraction of the image (< 1).
        min_zone_fraction: fraction of a lesion's pixels that makes a zone count as involved.

    Examples::

        >>> mask = np.zeros((90, 90), np.uint8)
        >>> mask[5:20, 60:80] = 1  # image right, top third -> patient's upper LEFT lung
        >>> chest_report(mask)
        'Unilateral pulmonary infection, one infected area, upper left lung.'
    """
    return format_chest_report(describe_chest_findings(mask, lung_mask, min_size, min_zone_fraction))


def lesion_position(centroid: tuple[float, float], shape: tuple[int, int]) -> str:
    """Where a centroid lies in the image: thirds give top/center/bottom and left/center/right.

    Args:
        centroid: (row, column).
        shape: (rows, columns) of the image.

    Returns:
        ``"center"``, a single side such as ``"right"`` or a corner such as ``"top left"``.
    """
    vertical = ("top", "center", "bottom")[min(2, int(3 * (centroid[0] + 0.5) / shape[0]))]
    horizontal = ("left", "center", "right")[min(2, int(3 * (centroid[1] + 0.5) / shape[1]))]
    if vertical == "center":
        return horizontal
    if horizontal == "center":
        return vertical
    return f"{vertical} {horizontal}"


def lesion_size_word(area_fraction: float, thresholds: tuple[float, float] = DEFAULT_SIZE_THRESHOLDS) -> str:
    """``"small"``, ``"medium"`` or ``"large"`` for a lesion covering ``area_fraction`` of the image.

    Args:
        area_fraction: lesion area / image area.
        thresholds: (small/medium, medium/large) boundaries, see :py:data:`DEFAULT_SIZE_THRESHOLDS`.
    """
    small, large = thresholds
    if not 0 < small < large:
        raise ValueError(f"size thresholds must satisfy 0 < small < large, got {thresholds}")
    if area_fraction < small:
        return "small"
    return "medium" if area_fraction < large else "large"


def generic_report(
    mask: Any,
    noun: str = "polyp",
    min_size: float = DEFAULT_MIN_SIZE,
    size_thresholds: tuple[float, float] = DEFAULT_SIZE_THRESHOLDS,
    plural: str | None = None,
) -> str:
    """A Kvasir-SEG style report: number, size and position of the lesions of a mask.

    Lesions are listed largest first. Sizes are by area fraction of the image
    (see :py:data:`DEFAULT_SIZE_THRESHOLDS`), positions by the third of the image holding the centroid
    (see :py:func:`lesion_position`); no left/right flip is applied (the image's own left and right).

    Args:
        mask: 2-D lesion mask in display orientation.
        noun: the lesion noun, e.g. ``"polyp"`` or ``"lesion"``.
        min_size: minimum lesion size in pixels (>= 1) or as a fraction of the image (< 1).
        size_thresholds: (small/medium, medium/large) area fraction boundaries.
        plural: plural of ``noun`` (default ``noun + "s"``).

    Examples::

        >>> mask = np.zeros((100, 100), np.uint8)
        >>> mask[45:55, 80:90] = 1
        >>> generic_report(mask)
        'one small polyp located in right of the image'
    """
    foreground = _as_2d(binarize_mask(mask))
    lesions = sorted(find_lesions(foreground, min_size), key=lambda lesion: -lesion.area)
    plural = plural or f"{noun}s"
    if not lesions:
        return f"no {noun} found in the image"
    phrases = [
        f"one {lesion_size_word(lesion.area / foreground.size, size_thresholds)} {noun} located in "
        f"{lesion_position(lesion.centroid, foreground.shape)} of the image"
        for lesion in lesions
    ]
    if len(phrases) == 1:
        return phrases[0]
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{count_word(len(lesions))} {plural}, {listed}"


def report_from_mask(mask: Any, style: str = "chest", lung_mask: Any | None = None, **kwargs: Any) -> str:
    """The report of ``mask`` in ``style`` (``"chest"`` or ``"generic"``).

    Args:
        mask: 2-D lesion mask in display orientation.
        style: one of :py:data:`REPORT_STYLES`.
        lung_mask: optional lung mask (chest style only).
        kwargs: passed to :py:func:`chest_report` or :py:func:`generic_report`.
    """
    if style == "chest":
        return chest_report(mask, lung_mask=lung_mask, **kwargs)
    if style == "generic":
        if lung_mask is not None:
            raise ValueError("lung_mask is only used by the 'chest' report style")
        return generic_report(mask, **kwargs)
    raise ValueError(f"unknown report style {style!r}, expected one of {REPORT_STYLES}")


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            image = image.convert("L")
        return np.asarray(image)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    dataset = pydicom.dcmread(path)
    if "PixelData" not in dataset:
        raise ValueError("the DICOM file has no pixel data")
    return dataset.pixel_array


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    from himix_monai.data.ct import radiological_view

    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    spatial = data.reshape(data.shape[:2] + tuple(size for size in data.shape[2:] if size != 1))
    if spatial.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got a volume of shape {data.shape}")
    return radiological_view(spatial, image.affine)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a 2-D mask file as a boolean array in display orientation.

    PNG/JPEG/TIFF/BMP are read with PIL (colour images are converted to grey), DICOM with pydicom
    (``pixel_array``), NIfTI with nibabel (MONAI layout, turned to display orientation with
    :py:func:`himix_monai.data.ct.radiological_view`), ``.npy`` with NumPy. The foreground is found
    with :py:func:`binarize_mask` (above 127 for 0..255 masks, else above 0.5).

    Args:
        path: the mask file.

    Raises:
        ValueError: naming the file, when it is missing, unreadable or not a 2-D image.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: mask file not found")
    name = path.name.lower()
    try:
        if name.endswith(PICTURE_EXTENSIONS):
            array = _read_pil(path)
        elif name.endswith(NIFTI_EXTENSIONS):
            array = _read_nifti(path)
        elif name.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            array = _read_dicom(path)
        return _as_2d(binarize_mask(array))
    except Exception as err:  # any reader failure becomes an error naming the file
        raise ValueError(f"{path}: cannot read mask: {err}") from err


def _resolve(path: str, base_dir: Path) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else base_dir / candidate


def fill_datalist_reports(
    datalist: Mapping[str, Any],
    style: str = "chest",
    min_size: float = DEFAULT_MIN_SIZE,
    overwrite: bool = False,
    base_dir: str | os.PathLike = ".",
    lung_key: str | None = None,
    source: str = "datalist",
    **report_kwargs: Any,
) -> tuple[dict[str, Any], int]:
    """Write the report of each item's ``label`` mask into its ``text``.

    Every list of items in the datalist (``training``, ``validation``, ``test``, ...) is processed; other
    top-level keys are copied unchanged.

    Args:
        datalist: a MONAI datalist; items need a ``label`` path (relative paths are resolved against ``base_dir``).
        style: one of :py:data:`REPORT_STYLES`.
        min_size: minimum lesion size in pixels (>= 1) or as a fraction of the image (< 1).
        overwrite: replace existing non-empty texts too (by default only missing/empty texts are filled).
        base_dir: folder relative paths are resolved against, usually the datalist's folder.
        lung_key: item key of an optional lung mask (chest style), e.g. ``"lung_mask"``.
        source: how to name the datalist in error messages.
        report_kwargs: passed to :py:func:`report_from_mask`.

    Returns:
        The new datalist and the number of texts written.

    Raises:
        ValueError: naming the datalist, split, item and file for a missing ``label`` or an unreadable mask.
    """
    base = Path(base_dir)
    filled = 0
    result: dict[str, Any] = {}
    for key, value in datalist.items():
        if not isinstance(value, list):
            result[key] = value
            continue
        items = []
        for position, item in enumerate(value, start=1):
            where = f"{source}: {key!r} item {position}"
            if not isinstance(item, Mapping) or not item.get("label"):
                raise ValueError(f"{where}: has no 'label' mask path")
            item = dict(item)
            if overwrite or not str(item.get("text") or "").strip():
                try:
                    mask = read_mask(_resolve(item["label"], base))
                    lungs = read_mask(_resolve(item[lung_key], base)) if lung_key and item.get(lung_key) else None
                    item["text"] = report_from_mask(mask, style, lung_mask=lungs, min_size=min_size, **report_kwargs)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from err
                filled += 1
            items.append(item)
        result[key] = items
    return result, filled


def mask_folder_reports(
    folder: str | os.PathLike,
    style: str = "chest",
    min_size: float = DEFAULT_MIN_SIZE,
    on_unreadable: Callable[[Path, str], None] | None = None,
    **report_kwargs: Any,
) -> list[tuple[str, str]]:
    """Reports for every mask file of a folder, sorted by file name.

    Args:
        folder: folder of 2-D masks (hidden files and non-image files are skipped).
        style: one of :py:data:`REPORT_STYLES`.
        min_size: minimum lesion size in pixels (>= 1) or as a fraction of the image (< 1).
        on_unreadable: called with the file and the error message for a mask that cannot be read, which is
            then left out; None raises the error instead.
        report_kwargs: passed to :py:func:`report_from_mask`.

    Returns:
        ``(file name, report)`` pairs.

    Raises:
        ValueError: naming the file of an unreadable mask, unless ``on_unreadable`` is given.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: mask folder not found")
    suffixes = PICTURE_EXTENSIONS + NIFTI_EXTENSIONS + DICOM_EXTENSIONS + (".npy",)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    rows = []
    for name in names:
        if name.lower().endswith(suffixes):
            try:
                mask = read_mask(folder / name)
            except ValueError as err:
                if on_unreadable is None:
                    raise
                on_unreadable(folder / name, str(err))
                continue
            rows.append((name, report_from_mask(mask, style, min_size=min_size, **report_kwargs)))
    return rows


def write_reports_csv(rows: Sequence[tuple[str, str]], path: str | os.PathLike) -> Path:
    """Write ``(image, description)`` rows as an ``Image,Description`` CSV (the LViT/GuideDecoder sheet format).

    The file is written to a temporary file next to ``path`` and moved over it, so it is never half-written.

    Args:
        rows: ``(image name, description)`` pairs.
        path: the CSV file.

    Returns:
        The absolute path written.
    """
    path = Path(path).absolute()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["Image", "Description"])
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue(), newline="")
    return path
