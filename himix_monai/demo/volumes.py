"""
A small synthetic chest-CT VOLUME dataset with one report per volume, for 2.5D (context slices) demos and tests.

Each case is a stack of ``depth`` axial slices of a chest phantom in Hounsfield units, built like the 2-D demo
(:py:mod:`himix_monai.demo.slices`): air, a body ellipse of soft tissue with a fat rim, a vertebra, two lungs
(-850 HU with texture) and thin bright vessels. The anatomy is constant along the slice axis (a cylinder), so the
lung zones of the report are the same on every slice.

- **Lesions** (1-3, in distinct named lung zones) are ground-glass **ellipsoids** (-500..-300 HU, smooth edges)
  that span 3-8 slices: on the axial slices their cross-section grows and shrinks. They are in the mask and in the
  report.
- **Decoys** (2-3 with ``decoys=True``, as many as fit) are **tubes along the slice axis** with the same HU, edge
  and in-plane size as a lesion: on any one axial slice a decoy is a round ground-glass blob that looks like a
  lesion cross-section, but it is present on every slice with the same size and its centre moves a little from
  slice to slice (a vessel-like structure). They are neither in the mask nor in the report. The first decoy is put
  in the zone of a reported lesion (at the middle slice; placement is retried there until it fits), so the report
  alone cannot tell it from the lesion: only the neighbouring slices can (this is what ``context_slices`` is for).

The report names the zones of the lesions (one report per volume, the same sentence style as the 2-D demo,
written by :py:func:`himix_monai.mask_reports.format_chest_report` and checked against
:py:func:`~himix_monai.mask_reports.describe_chest_findings` of the mask's projection along the slice axis), e.g.
"Unilateral pulmonary infection, one infected area, upper left lung." Per-slice reports are not written.

Files written under the output folder (``vol_0000`` ...)::

    images/vol_0000.nii.gz     3-D NIfTI, int16 HU, MONAI layout (column, row, slice) <- the datalist "image"
    labels/vol_0000.nii.gz     3-D NIfTI, uint8 0/1 lesion mask, same geometry          <- the datalist "label"
    dicom/vol_0000/slice_000.dcm ...  the same volume as a CT DICOM series (one file per slice; ``dicom_series``
                               cases, default all)                                       <- "image_dicom"
    datalist.json              {"training", "validation", "test", "generator": {settings}, "description"}

``LoadImaged`` gives the same array and affine for the NIfTI image and the DICOM series folder (read with
``monai.data.PydicomReader``), so the NIfTI label fits both. Everything is deterministic for a seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from himix_monai.data.ct import dicom_slice_affine
from himix_monai.demo.slices import (
    DEFAULT_SPLIT_FRACTIONS,
    GROUND_GLASS_HU,
    HU_LUNG,
    LESION_CELLS,
    MIN_SIZE,
    RESCALE_INTERCEPT,
    chest_outline,
    demo_uid,
    ellipse_radius,
    ensure_generated,
    write_ct_dicom,
    write_dicom_file,
    write_display_nifti,
    write_split_datalist,
    zone_rows,
)
from himix_monai.mask_reports import (
    LUNG_SIDES,
    LUNG_ZONES,
    ChestFindings,
    describe_chest_findings,
    format_chest_report,
)

__all__ = [
    "MIN_DEPTH",
    "SLICE_SPACING_MM",
    "SyntheticChestVolume",
    "synthesize_chest_volume",
    "write_ct_dicom_series",
    "volume_demo_settings",
    "generate_volume_demo_dataset",
    "ensure_volume_demo_dataset",
]

MIN_DEPTH = 8
"""Fewest slices of a demo volume (a lesion spans up to 8 slices)."""
SLICE_SPACING_MM = 5.0
"""Distance between two slices of a demo volume."""
FIELD_OF_VIEW_MM = 350.0
FIRST_SLICE_MM = -200.0
_MAX_TRIES = 80
_UID_NAMESPACE = "himix-monai-volume-demo"


@dataclass
class SyntheticChestVolume:
    """One synthetic volume in display orientation: arrays are ``(slice, row, column)``.

    Args:
        hu: int16 HU volume.
        lesion_mask: uint8 0/1 mask of the reported lesions.
        decoy_mask: uint8 0/1 mask of the decoy tubes (in ``hu`` only; kept for tests and figures).
        lung_mask: uint8 0/1 2-D mask of both lungs (the same on every slice).
        lesion_cells: (side, zone) of each reported lesion.
        decoy_cells: (side, zone) of each decoy at the middle slice.
    """

    hu: np.ndarray
    lesion_mask: np.ndarray
    decoy_mask: np.ndarray
    lung_mask: np.ndarray
    lesion_cells: list[tuple[str, str]] = field(default_factory=list)
    decoy_cells: list[tuple[str, str]] = field(default_factory=list)

    @property
    def report(self) -> str:
        """The volume's report: the zones of its lesions."""
        zones = {side: tuple(z for z in LUNG_ZONES if (side, z) in self.lesion_cells) for side in LUNG_SIDES}
        return format_chest_report(ChestFindings(count=len(self.lesion_cells), zones=zones))


def _cell_of(lungs: dict[str, np.ndarray], lung_mask: np.ndarray, row: float, column: int) -> tuple[str, str]:
    side = "left" if lungs["left"][int(round(row)), column] else "right"
    for zone in LUNG_ZONES:
        low, high = zone_rows(lung_mask, zone)
        if low <= row < high:
            return side, zone
    return side, LUNG_ZONES[-1]


def _weight(field_: np.ndarray) -> np.ndarray:
    """Smooth-edged blending weight of a normalised radius field (0.5 at the edge, field == 1)."""
    return 1.0 / (1.0 + np.exp(-(1.0 - field_) / 0.12))


def _paint(rng: np.random.Generator, hu: np.ndarray, weight: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(rng.standard_normal(hu.shape), (0.6, 1.0, 1.0))
    texture *= 20.0 / max(float(texture.std()), 1e-6)
    return hu * (1.0 - weight) + (rng.uniform(*GROUND_GLASS_HU) + texture) * weight


def _in_plane_radii(rng: np.random.Generator, size: int) -> tuple[float, float]:
    return rng.uniform(0.035, 0.06) * size, rng.uniform(0.035, 0.06) * size


def _place_lesion(
    rng: np.random.Generator, lung: np.ndarray, zone_rows: tuple[float, float], keep_clear: np.ndarray, depth: int
) -> np.ndarray | None:
    """3-D normalised radius field of an ellipsoid lesion inside ``lung`` and ``zone_rows``, clear of
    ``keep_clear`` (2-D); None if none fits."""
    size = lung.shape[0]
    rows, columns = np.nonzero(lung)
    inside = (rows > zone_rows[0] + 1) & (rows < zone_rows[1] - 1)
    rows, columns = rows[inside], columns[inside]
    if rows.size == 0:
        return None
    z = np.arange(depth, dtype=np.float64)[:, None, None]
    for attempt in range(_MAX_TRIES):
        scale = max(0.6, 0.99**attempt)
        radii = tuple(r * scale for r in _in_plane_radii(rng, size))
        z_radius = rng.uniform(1.5, min(4.0, depth / 2.0 - 1.0))
        z_center = rng.uniform(z_radius, depth - 1 - z_radius)
        pick = rng.integers(rows.size)
        plane = ellipse_radius(lung.shape, (rows[pick], columns[pick]), radii)
        blob = plane < 1.0
        blob_rows = np.flatnonzero(blob.any(axis=1))
        if not (blob_rows[0] > zone_rows[0] and blob_rows[-1] < zone_rows[1]):
            continue
        if (blob & lung).sum() < 0.85 * blob.sum() or (blob & keep_clear).any() or (blob & lung).sum() < 8:
            continue
        return np.sqrt(plane[None] ** 2 + ((z - z_center) / z_radius) ** 2)
    return None


def _place_tube(
    rng: np.random.Generator, lung_mask: np.ndarray, start: tuple[int, int], keep_clear: np.ndarray, depth: int
) -> np.ndarray | None:
    """3-D normalised radius field of a tube along the slice axis through ``start`` at the middle slice, with a
    constant in-plane cross-section whose centre moves 0.25-0.6 pixel per slice; None if it leaves the lungs or
    touches ``keep_clear`` (3-D)."""
    radii = tuple(r * 0.85 for r in _in_plane_radii(rng, lung_mask.shape[0]))
    angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(0.25, 0.6)
    offsets = np.arange(depth, dtype=np.float64) - (depth - 1) / 2.0
    rows = start[0] + speed * math.sin(angle) * offsets
    columns = start[1] + speed * math.cos(angle) * offsets
    fields = np.stack([ellipse_radius(lung_mask.shape, (r, c), radii) for r, c in zip(rows, columns)])
    tube = fields < 1.0
    if (tube & ~lung_mask[None]).sum() > 0.15 * tube.sum() or (tube & keep_clear).any():
        return None
    return fields


def _add_vessels(rng: np.random.Generator, hu: np.ndarray, lung_mask: np.ndarray, count: int) -> np.ndarray:
    """Thin bright vessels (Gaussian profile, 0.7-1 pixel) running along the slice axis with a slow drift."""
    rows, columns = np.nonzero(lung_mask)
    picks = rng.choice(rows.size, size=min(count, rows.size), replace=False)
    grid_r, grid_c = np.ogrid[: hu.shape[1], : hu.shape[2]]
    offsets = np.arange(hu.shape[0]) - (hu.shape[0] - 1) / 2.0
    for pick in picks:
        drift, width, height = rng.uniform(-0.3, 0.3, 2), rng.uniform(0.7, 1.0), rng.uniform(250.0, 400.0)
        for z, t in enumerate(offsets):
            d2 = (grid_r - rows[pick] - drift[0] * t) ** 2 + (grid_c - columns[pick] - drift[1] * t) ** 2
            hu[z] += np.where(lung_mask, height * np.exp(-d2 / (2 * width**2)), 0.0)
    return hu


def synthesize_chest_volume(
    seed: int, index: int, size: int = 64, depth: int = 24, decoys: bool = True
) -> SyntheticChestVolume:
    """Synthesize volume ``index`` of the volume demo dataset for ``seed`` (see the module docstring).

    Args:
        seed: dataset seed.
        index: case index.
        size: in-plane size in pixels (square, at least :py:data:`himix_monai.demo.slices.MIN_SIZE`).
        depth: number of slices (at least :py:data:`MIN_DEPTH`).
        decoys: add 2-3 unreported, unmasked decoy tubes.

    Examples::

        >>> case = synthesize_chest_volume(0, 0, size=64, depth=24)
        >>> case.hu.shape, case.report  # doctest: +SKIP
        ((24, 64, 64), 'Unilateral pulmonary infection, one infected area, lower right lung.')
    """
    from scipy.ndimage import binary_dilation, gaussian_filter

    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    if depth < MIN_DEPTH:
        raise ValueError(f"depth must be at least {MIN_DEPTH} slices, got {depth}")
    for attempt in range(8):  # a new draw when the lesions cannot be placed or the report check fails
        rng = np.random.default_rng([seed, index, attempt, 3])
        plane, lung_mask, lungs = chest_outline(rng, size)
        texture = gaussian_filter(rng.standard_normal((depth, size, size)), (0.8, 1.2, 1.2))
        hu = np.where(lung_mask, HU_LUNG + texture * (25.0 / max(float(texture.std()), 1e-6)), plane[None])
        hu = _add_vessels(rng, hu, lung_mask, count=max(4, size // 8))
        cells = [LESION_CELLS[i] for i in rng.choice(len(LESION_CELLS), size=int(rng.integers(1, 4)), replace=False)]
        lesion_mask = np.zeros(hu.shape, dtype=bool)
        placed = []
        for side, zone in cells:
            keep_clear = binary_dilation(lesion_mask.any(axis=0), iterations=2)
            field_ = _place_lesion(rng, lungs[side], zone_rows(lung_mask, zone), keep_clear, depth)
            if field_ is None:
                continue
            hu = _paint(rng, hu, _weight(field_) * lungs[side][None])
            lesion_mask |= (field_ < 1.0) & lungs[side][None]
            placed.append((side, zone))
        findings = describe_chest_findings(lesion_mask.any(axis=0), lung_mask=lung_mask)
        expected = {side: tuple(zone for zone in LUNG_ZONES if (side, zone) in placed) for side in LUNG_SIDES}
        if placed and findings.count == len(placed) and dict(findings.zones) == expected:
            break
    else:
        raise RuntimeError(f"volume demo case {index} (seed {seed}): no lesion layout matched its report")
    decoy_mask = np.zeros(hu.shape, dtype=bool)
    decoy_cells: list[tuple[str, str]] = []
    if decoys:
        decoy_rng = np.random.default_rng([seed, index, 4])
        keep_clear = binary_dilation(lesion_mask, iterations=2)
        rows, columns = np.nonzero(lung_mask)
        wanted = int(decoy_rng.integers(2, 4))
        first_zone = zone_rows(lung_mask, placed[0][1])
        in_first = (rows > first_zone[0] + 1) & (rows < first_zone[1] - 1) & lungs[placed[0][0]][rows, columns]
        for _ in range(_MAX_TRIES * 2):
            if len(decoy_cells) == wanted:
                break
            pool = np.flatnonzero(in_first) if not decoy_cells and in_first.any() else np.arange(rows.size)
            pick = int(decoy_rng.choice(pool))
            field_ = _place_tube(decoy_rng, lung_mask, (rows[pick], columns[pick]), keep_clear | decoy_mask, depth)
            if field_ is None:
                continue
            hu = _paint(decoy_rng, hu, _weight(field_) * lung_mask[None])
            decoy_mask |= (field_ < 1.0) & lung_mask[None]
            decoy_cells.append(_cell_of(lungs, lung_mask, float(rows[pick]), int(columns[pick])))
    hu = hu + rng.normal(0.0, 8.0, hu.shape)  # quantum noise
    hu = np.clip(np.rint(hu), RESCALE_INTERCEPT, 3071).astype(np.int16)
    return SyntheticChestVolume(
        hu=hu,
        lesion_mask=lesion_mask.astype(np.uint8),
        decoy_mask=decoy_mask.astype(np.uint8),
        lung_mask=lung_mask.astype(np.uint8),
        lesion_cells=placed,
        decoy_cells=decoy_cells,
    )


def write_ct_dicom_series(
    hu: np.ndarray, folder: str | os.PathLike, seed: int, name: str, pixel_spacing: float, slice_spacing: float
) -> np.ndarray:
    """Write a display-orientation ``(slice, row, column)`` HU volume as a CT DICOM series, one file per slice.

    Each slice is made by :py:func:`himix_monai.demo.slices.write_ct_dicom` (uint16 stored values, intercept -1024)
    and then given the series' shared Study/Series/Frame-of-Reference UIDs, its ``InstanceNumber`` (1, 2, ...)
    and its position (slice ``j`` at ``FIRST_SLICE_MM + j * slice_spacing`` along the axial normal), and written
    again with :py:func:`~himix_monai.demo.slices.write_dicom_file`.

    Args:
        hu: int16 HU volume ``(slice, row, column)``.
        folder: output folder (created), files ``slice_000.dcm`` ...
        seed: dataset seed (for the UIDs).
        name: case name (for the UIDs and the patient ID).
        pixel_spacing: in-plane spacing in mm.
        slice_spacing: distance between slices in mm.

    Returns:
        The RAS affine of the series in MONAI layout (``(column, row, slice)``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shared = {kind: demo_uid(seed, name, kind, _UID_NAMESPACE) for kind in ("study", "series", "frame")}
    affine = None
    for j, plane in enumerate(hu):
        path = folder / f"slice_{j:03d}.dcm"
        ds = write_ct_dicom(plane, path, seed, f"{name}_slice_{j:03d}", pixel_spacing)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = shared["study"], shared["series"]
        ds.FrameOfReferenceUID = shared["frame"]
        ds.PatientName, ds.PatientID = f"Demo^{name}", name
        ds.InstanceNumber = j + 1
        z = round(FIRST_SLICE_MM + j * slice_spacing, 6)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z]
        ds.SliceLocation, ds.SliceThickness, ds.SpacingBetweenSlices = z, slice_spacing, slice_spacing
        write_dicom_file(ds, path)
        if affine is None:
            affine = dicom_slice_affine(ds)  # the slice normal times SpacingBetweenSlices
    assert affine is not None
    return affine


def _write_case(out_dir: Path, seed: int, index: int, size: int, depth: int, decoys: bool, dicom: bool) -> dict:
    name = f"vol_{index:04d}"
    case = synthesize_chest_volume(seed, index, size=size, depth=depth, decoys=decoys)
    image, label = out_dir / "images" / f"{name}.nii.gz", out_dir / "labels" / f"{name}.nii.gz"
    pixel_spacing = round(FIELD_OF_VIEW_MM / size, 6)
    item = {"image": str(image), "label": str(label), "text": case.report}
    if dicom:
        series = out_dir / "dicom" / name
        affine = write_ct_dicom_series(case.hu, series, seed, name, pixel_spacing, SLICE_SPACING_MM)
        item["image_dicom"] = str(series)
    else:
        affine = np.diag([-pixel_spacing, -pixel_spacing, SLICE_SPACING_MM, 1.0])
        corner = (size - 1) / 2.0 * pixel_spacing
        affine[:3, 3] = (corner, corner, FIRST_SLICE_MM)  # RAS of the DICOM corner (-c, -c, z) in LPS
    write_display_nifti(case.hu, affine, image)
    write_display_nifti(case.lesion_mask, affine, label)
    return item


def volume_demo_settings(
    num: int = 24, seed: int = 0, size: int = 64, depth: int = 24, decoys: bool = True, dicom_series: int | None = None
) -> dict[str, Any]:
    """The generator settings recorded in a volume demo datalist (key ``"generator"``) and compared on reuse.

    Args:
        num: number of volumes.
        seed: random seed.
        size: in-plane size in pixels.
        depth: slices per volume.
        decoys: decoy tubes on or off.
        dicom_series: how many cases (the first ones) are also written as DICOM series; None: all.
    """
    series = int(num) if dicom_series is None else min(int(dicom_series), int(num))
    return {
        "kind": "volumes",
        "num": int(num),
        "seed": int(seed),
        "size": int(size),
        "depth": int(depth),
        "decoys": bool(decoys),
        "dicom_series": series,
    }


def generate_volume_demo_dataset(
    out_dir: str | os.PathLike,
    num: int = 24,
    seed: int = 0,
    size: int = 64,
    depth: int = 24,
    decoys: bool = True,
    dicom_series: int | None = None,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> Path:
    """Write the synthetic volume demo dataset (NIfTI volumes, label volumes, DICOM series, reports and a datalist
    of volumes) into ``out_dir``; the datalist is written last, atomically.

    Items are ``{"image": NIfTI volume, "label": NIfTI label volume, "text": report}`` plus ``"image_dicom"`` (the
    DICOM series folder of the same volume) for the first ``dicom_series`` cases.

    Args:
        out_dir: output folder (created).
        num: number of volumes.
        seed: random seed; the same seed gives the same data.
        size: in-plane size in pixels (at least 64).
        depth: slices per volume (at least :py:data:`MIN_DEPTH`).
        decoys: add the decoy tubes (see the module docstring).
        dicom_series: how many cases are also written as DICOM series; None (default): all.
        split_fractions: training/validation/test fractions, see :py:func:`himix_monai.demo.slices.split_counts`.

    Returns:
        The datalist path.

    Examples::

        >>> datalist = generate_volume_demo_dataset("/tmp/himix_volumes", num=6, depth=16)  # doctest: +SKIP
    """
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    settings = volume_demo_settings(num, seed, size, depth, decoys, dicom_series)
    out_dir = Path(out_dir).absolute()
    for folder in ("images", "labels"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    items = [
        _write_case(out_dir, seed, index, size, depth, decoys, index < settings["dicom_series"]) for index in range(num)
    ]
    description = (
        "HiMix-MONAI synthetic chest CT volume demo (image: 3-D NIfTI in HU; label: 3-D NIfTI; "
        "image_dicom: the same volume as a DICOM series; text: one report per volume)"
    )
    return write_split_datalist(out_dir, items, description, settings, split_fractions)


def ensure_volume_demo_dataset(
    dataset_dir: str | os.PathLike,
    num: int = 24,
    seed: int = 0,
    size: int = 64,
    depth: int = 24,
    decoys: bool = True,
    dicom_series: int | None = None,
) -> Path:
    """Return the volume demo datalist in ``dataset_dir``, generating the dataset first if it has no datalist.

    The demo generators' rule (:py:func:`himix_monai.demo.slices.ensure_generated`): generation under a file lock,
    and an existing datalist is reused only when it records the same generator settings; otherwise
    :py:class:`~himix_monai.demo.slices.DemoDatasetMismatchError` names the differences and nothing is deleted.

    Args:
        dataset_dir: the dataset folder (created).
        num: number of volumes.
        seed: random seed.
        size: in-plane size in pixels.
        depth: slices per volume.
        decoys: add the decoy tubes.
        dicom_series: how many cases are also written as DICOM series; None: all.

    Raises:
        DemoDatasetMismatchError: ``dataset_dir`` holds a datalist made with other settings or by another generator.
    """
    return ensure_generated(
        dataset_dir,
        volume_demo_settings(num, seed, size, depth, decoys, dicom_series),
        lambda folder: generate_volume_demo_dataset(folder, num, seed, size, depth, decoys, dicom_series),
    )
