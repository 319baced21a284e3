"""
Structured lesion reports written from binary masks, in the style of the published text annotations:
QaTa-COV19/MosMedData+ (LViT, Li et al.), "Bilateral pulmonary infection, two infected areas, upper left lung and
lower right lung.", by :py:func:`chest_report`, and Kvasir-SEG, "one small polyp located in right of the image",
by :py:func:`generic_report`. Deterministic, so that datasets without text (and the synthetic demo,
:py:mod:`himix_monai.demo.slices`) can be used for text-guided segmentation; ``python -m data_prep.reports``
applies them to a datalist or a folder of masks (:py:func:`read_mask`).

The report functions take a 2-D mask in *display orientation* (``mask[row, column]``, rows top to bottom,
columns image left to right: a PNG read with PIL, a DICOM ``pixel_array``), binarized as training binarizes masks
(:py:class:`~himix_monai.transforms.BinarizeMask`). Chest images follow the radiological convention: the
patient's RIGHT lung is on the IMAGE LEFT, so a lesion in the image left half is reported in the "right lung".
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "REPORT_STYLES",
    "DEFAULT_MIN_SIZE",
    "DEFAULT_MIN_ZONE_FRACTION",
    "DEFAULT_SIZE_THRESHOLDS",
    "LUNG_SIDES",
    "LUNG_ZONES",
    "NO_CHEST_FINDING",
    "ChestFindings",
    "count_word",
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


def _foreground(mask: Any, name: str = "mask") -> np.ndarray:
    """The 2-D boolean foreground of ``mask`` (singleton dimensions squeezed), by training's ``BinarizeMask``."""
    from himix_monai.transforms.mask import BinarizeMask  # here: the transforms package imports data

    array = np.squeeze(np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask))
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D image, got shape {tuple(np.shape(mask))}")
    return BinarizeMask()(array[None].astype(np.float32))[0] > 0


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


def find_lesions(mask: Any, min_size: float = DEFAULT_MIN_SIZE) -> list:
    """The lesions of a mask: 8-connected foreground components of at least ``min_size`` pixels.

    Args:
        mask: 2-D mask (singleton dimensions are squeezed), binarized as training binarizes masks.
        min_size: minimum size in pixels (>= 1) or as a fraction of the image (< 1).

    Returns:
        The lesions as ``skimage.measure.regionprops`` regions (``coords``, ``area``, ``centroid``), in raster
        order of their first pixel.
    """
    from skimage.measure import label, regionprops

    foreground = _foreground(mask)
    minimum = resolve_min_size(min_size, foreground.size)
    return [region for region in regionprops(label(foreground, connectivity=2)) if region.area >= minimum]


def _lung_field(shape: tuple[int, int], lung_mask: Any | None) -> tuple[float, float, float]:
    """(top, height, midline column) of the lung field: the lung mask's bounding box, else the image."""
    if lung_mask is not None:
        lungs = _foreground(lung_mask, "lung_mask")
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
    foreground = _foreground(mask)
    lesions = find_lesions(foreground, min_size)
    top, height, midline = _lung_field(foreground.shape, lung_mask)
    involved: dict[str, set[int]] = {side: set() for side in LUNG_SIDES}
    for lesion in lesions:
        rows, columns = lesion.coords[:, 0], lesion.coords[:, 1]
        zone = np.clip(np.floor((rows + 0.5 - top) / height * 3), 0, 2).astype(int)
        side = np.where(columns + 0.5 < midline, 1, 0)  # image left -> patient right (index 1)
        cells = np.bincount(side * 3 + zone, minlength=6)
        chosen = cells >= min_zone_fraction * rows.size
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
    foreground = _foreground(mask)
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


@functools.cache
def _mask_loader() -> Any:
    """``LoadImage`` with MONAI's layout for every format, made once (making one logs a reader warning)."""
    from monai.data import NibabelReader, PILReader, PydicomReader
    from monai.transforms import LoadImage

    return LoadImage(reader=[PydicomReader(), NibabelReader(), PILReader()], image_only=True, ensure_channel_first=True)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a 2-D mask file as a boolean array in display orientation.

    The file is loaded with MONAI's ``LoadImage`` (PIL for pictures, nibabel for NIfTI, pydicom for DICOM),
    binarized as training binarizes masks (:py:class:`~himix_monai.transforms.BinarizeMask`: any colour channel,
    above 127 for 0..255 masks, else above 0.5) and turned to display orientation with the file's affine
    (:py:func:`himix_monai.data.ct.radiological_view`).

    Args:
        path: the mask file.

    Raises:
        ValueError: naming the file, when it is missing, unreadable or not a 2-D image.
    """
    from himix_monai.data.ct import radiological_view
    from himix_monai.transforms.mask import BinarizeMask  # here: the transforms package imports data

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: mask file not found")
    try:
        mask = BinarizeMask()(_mask_loader()(path))
        return radiological_view(mask[0].numpy() > 0, mask.affine.numpy())
    except Exception as err:  # any reader failure becomes an error naming the file
        raise ValueError(f"{path}: cannot read mask: {err}") from err
