"""
A small synthetic chest-CT dataset with reports, for demos, tests and smoke runs of the bundle.

Each case is one axial slice of a chest phantom in Hounsfield units: air outside the body (-1000 HU), a body
ellipse of soft tissue (+40 HU) with a fat rim, a vertebra, two lungs (-850 HU, with texture and vessels) and
1-3 smooth-edged ground-glass lesions (-500..-300 HU) placed in named lung zones (patient left/right x
upper/middle/lower thirds of the lung field; radiological convention: the patient's right lung is on the image
left). The report is written from the lesion mask by :py:func:`himix_monai.mask_reports.chest_report` (with the
lung mask as lung field), e.g.
"Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."

With ``decoys=True`` (the default) each case also gets 1-2 decoy lesions of the same appearance in other zones
that are neither in the mask nor in the report, so only a model that reads the text can reach a high Dice: an
image-only model cannot tell a reported lesion from a decoy.

Files written under the output folder (``case_0000`` ...)::

    images/case_0000.nii.gz   2-D NIfTI, int16 HU          <- the datalist "image"
    dicom/case_0000.dcm       CT Image Storage DICOM, uint16 stored values, RescaleIntercept -1024, slope 1
    labels/case_0000.nii.gz   2-D NIfTI, uint8 0/1 lesion mask (same geometry as the image)
    lungs/case_0000.nii.gz    2-D NIfTI, uint8 0/1 lung mask (the lung field used for the report zones)
    datalist.json             {"training": [...], "validation": [...], "test": [...], "generator": {settings}}

Datalist items are ``{"image", "label", "text", "image_dicom", "lung_mask"}`` with absolute paths. The NIfTI
files use MONAI's layout (axis 0 = image column, axis 1 = image row) and the affine of the DICOM slice, so
``LoadImaged`` gives the same array and affine for the NIfTI image and the DICOM file. Everything is
deterministic for a seed: same arrays, same texts, same file bytes (DICOM UIDs are derived from the seed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from himix_monai.data.ct import dicom_slice_affine
from himix_monai.data.datalist import write_datalist
from himix_monai.mask_reports import LUNG_SIDES, LUNG_ZONES, describe_chest_findings, format_chest_report
from himix_monai.errors import HiMixError

__all__ = [
    "DATALIST_NAME",
    "DEFAULT_SPLIT_FRACTIONS",
    "LESION_CELLS",
    "chest_outline",
    "ellipse_radius",
    "MIN_SIZE",
    "SyntheticChestSlice",
    "synthesize_chest_slice",
    "write_ct_dicom",
    "write_dicom_file",
    "write_display_nifti",
    "demo_uid",
    "zone_rows",
    "split_counts",
    "write_split_datalist",
    "generate_demo_dataset",
    "ensure_demo_dataset",
    "ensure_generated",
    "demo_settings",
    "DemoDatasetMismatchError",
]

DATALIST_NAME = "datalist.json"
"""File name of the datalist in a demo dataset folder."""

DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
"""Fractions of the cases in the training, validation and test splits."""

LESION_CELLS: tuple[tuple[str, str], ...] = tuple((side, zone) for side in LUNG_SIDES for zone in LUNG_ZONES)
"""The named lung zones lesions are placed in: (patient side, zone)."""

MIN_SIZE = 64
"""Smallest supported image size in pixels (smaller lung zones cannot hold separate lesions)."""

FIELD_OF_VIEW_MM = 350.0
SLICE_POSITION_MM = -150.0
SLICE_THICKNESS_MM = 1.0
RESCALE_INTERCEPT = -1024
HU_AIR, HU_LUNG, HU_SOFT_TISSUE, HU_FAT, HU_BONE = -1000.0, -850.0, 40.0, -100.0, 450.0
GROUND_GLASS_HU = (-500.0, -300.0)

_MAX_PLACEMENT_TRIES = 60


@dataclass
class SyntheticChestSlice:
    """One synthetic case in display orientation (rows top to bottom, patient's right on the image left).

    Args:
        hu: int16 HU image.
        lesion_mask: uint8 0/1 mask of the reported lesions.
        lung_mask: uint8 0/1 mask of both lungs.
        lesion_cells: (side, zone) of each reported lesion.
        decoy_cells: (side, zone) of each decoy lesion (in ``hu`` only).
    """

    hu: np.ndarray
    lesion_mask: np.ndarray
    lung_mask: np.ndarray
    lesion_cells: list[tuple[str, str]] = field(default_factory=list)
    decoy_cells: list[tuple[str, str]] = field(default_factory=list)


def ellipse_radius(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    """Normalised elliptic radius (< 1 inside) on the pixel grid."""
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return np.sqrt(((rows - center[0]) / radii[0]) ** 2 + ((columns - center[1]) / radii[1]) ** 2)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float, std: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape), sigma)
    return noise * (std / max(float(noise.std()), 1e-6))


def chest_outline(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The chest of a demo case before lung texture: HU image (air, fat, soft tissue, spine), the lung mask and each
    lung's own mask (keyed by patient side; patient right = image left). Shared by the 2-D and the volume demo.

    Args:
        rng: the case's random stream (four jitters are drawn from it).
        size: image size in pixels (square).
    """
    shape = (size, size)

    def jitter() -> float:
        return 1.0 + rng.uniform(-0.05, 0.05)

    hu = np.full(shape, HU_AIR)
    body = ellipse_radius(shape, (0.5 * size * jitter(), 0.5 * size), (0.33 * size * jitter(), 0.44 * size * jitter()))
    hu[body < 1.0] = HU_FAT
    hu[body < 0.93] = HU_SOFT_TISSUE
    spine = ellipse_radius(shape, (0.76 * size, 0.5 * size), (0.055 * size, 0.06 * size))
    hu[spine < 1.0] = HU_BONE
    lungs = {}
    for side, offset in (("right", -0.19), ("left", 0.19)):  # patient right = image left
        center = (0.47 * size * jitter(), (0.5 + offset * jitter()) * size)
        lungs[side] = (ellipse_radius(shape, center, (0.24 * size * jitter(), 0.14 * size * jitter())) < 1.0) & (
            body < 0.85
        )
    return hu, lungs["left"] | lungs["right"], lungs


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """HU image without lesions, the lung mask and each lung's own mask (keyed by patient side)."""
    hu, lung_mask, lungs = chest_outline(rng, size)
    shape = (size, size)
    texture = HU_LUNG + _smooth_noise(rng, shape, 1.2, 25.0)
    hu = np.where(lung_mask, texture, hu)
    hu = _add_vessels(rng, hu, lung_mask, count=max(4, size // 16))
    return hu, lung_mask, lungs


def _add_vessels(rng: np.random.Generator, hu: np.ndarray, lung_mask: np.ndarray, count: int) -> np.ndarray:
    """Small bright dots in the lungs (vessels seen in cross-section)."""
    from scipy.ndimage import gaussian_filter

    rows, columns = np.nonzero(lung_mask)
    picks = rng.choice(rows.size, size=min(count * 2, rows.size), replace=False)
    spikes = np.zeros(hu.shape)
    spikes[rows[picks], columns[picks]] = rng.uniform(2.0, 4.0, size=picks.size)
    vessels = gaussian_filter(spikes, 0.7) * 450.0
    return np.where(lung_mask, hu + vessels, hu)


def zone_rows(lung_mask: np.ndarray, zone: str) -> tuple[float, float]:
    """Row range [low, high) of a zone: the same thirds of the lung field :py:func:`chest_report` uses."""
    rows = np.flatnonzero(lung_mask.any(axis=1))
    top, height = float(rows[0]), float(rows[-1] + 1 - rows[0])
    index = LUNG_ZONES.index(zone)
    return top + index * height / 3.0 - 0.5, top + (index + 1) * height / 3.0 - 0.5


def _lesion_radius_field(
    shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float], angle: float, harmonics: np.ndarray
) -> np.ndarray:
    """Normalised radius of a smooth, slightly irregular blob (< 1 inside)."""
    rows, columns = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = rows - center[0], columns - center[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(amp * np.cos((k + 2) * theta + phase) for k, (amp, phase) in enumerate(harmonics))
    return np.sqrt((u / radii[1]) ** 2 + (v / radii[0]) ** 2) / wobble


def _place_lesion(
    rng: np.random.Generator, lung: np.ndarray, zone_rows: tuple[float, float], occupied: np.ndarray, size: int
) -> np.ndarray | None:
    """Radius field of a lesion lying inside ``lung`` within ``zone_rows``, clear of ``occupied``; None if none fits."""
    from scipy.ndimage import binary_dilation

    rows, columns = np.nonzero(lung)
    inside = (rows > zone_rows[0] + 1) & (rows < zone_rows[1] - 1)
    rows, columns = rows[inside], columns[inside]
    if rows.size == 0:
        return None
    keep_clear = binary_dilation(occupied, iterations=2)
    scale = 1.0
    for _ in range(_MAX_PLACEMENT_TRIES):
        radii = (rng.uniform(0.025, 0.045) * size * scale, rng.uniform(0.03, 0.06) * size * scale)
        harmonics = np.stack([rng.uniform(0.0, 0.06, 2), rng.uniform(0.0, 2 * math.pi, 2)], axis=1)
        pick = rng.integers(rows.size)
        field = _lesion_radius_field(lung.shape, (rows[pick], columns[pick]), radii, rng.uniform(-0.3, 0.3), harmonics)
        blob = field < 1.0
        blob_rows = np.flatnonzero(blob.any(axis=1))
        within_zone = blob_rows[0] > zone_rows[0] and blob_rows[-1] < zone_rows[1]
        mostly_in_lung = (blob & lung).sum() >= 0.85 * blob.sum()
        big_enough = (blob & lung).sum() >= max(8, 0.0015 * size * size)
        if within_zone and mostly_in_lung and big_enough and not (blob & keep_clear).any():
            return field
        scale = max(0.5, scale * 0.97)
    return None


def _paint_lesion(rng: np.random.Generator, hu: np.ndarray, field: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Blend a ground-glass lesion with a smooth edge into the lung."""
    weight = 1.0 / (1.0 + np.exp(-(1.0 - field) / 0.12)) * lung
    lesion_hu = rng.uniform(*GROUND_GLASS_HU) + _smooth_noise(rng, hu.shape, 1.0, 20.0)
    return hu * (1.0 - weight) + lesion_hu * weight


def _place_lesions(
    rng: np.random.Generator,
    hu: np.ndarray,
    lungs: dict[str, np.ndarray],
    lung_mask: np.ndarray,
    cells: Sequence[tuple[str, str]],
    occupied: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Paint lesions into ``cells``; returns the new image, their mask and the cells actually used."""
    mask = np.zeros(hu.shape, dtype=bool)
    placed = []
    for side, zone in cells:
        field = _place_lesion(rng, lungs[side], zone_rows(lung_mask, zone), occupied | mask, hu.shape[0])
        if field is None:
            continue
        hu = _paint_lesion(rng, hu, field, lungs[side])
        mask |= (field < 1.0) & lungs[side]
        placed.append((side, zone))
    return hu, mask, placed


def synthesize_chest_slice(seed: int, index: int, size: int = 128, decoys: bool = False) -> SyntheticChestSlice:
    """Synthesize case ``index`` of the demo dataset for ``seed``.

    The anatomy and the reported lesions come from one random stream and the decoys from another, so a
    case has the same mask and report with and without decoys.

    Args:
        seed: dataset seed.
        index: case index.
        size: image size in pixels (square, at least :py:data:`MIN_SIZE`).
        decoys: add 1-2 unreported, unmasked decoy lesions in other lung zones.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    rng = np.random.default_rng([seed, index, 0])
    hu, lung_mask, lungs = _anatomy(rng, size)
    cells = [LESION_CELLS[i] for i in rng.choice(len(LESION_CELLS), size=int(rng.integers(1, 4)), replace=False)]
    hu, lesion_mask, placed = _place_lesions(rng, hu, lungs, lung_mask, cells, np.zeros_like(lung_mask))
    if not placed:
        raise RuntimeError(f"demo case {index} (seed {seed}): no lesion could be placed")
    decoy_cells: list[tuple[str, str]] = []
    if decoys:
        decoy_rng = np.random.default_rng([seed, index, 1])
        free = [cell for cell in LESION_CELLS if cell not in placed]
        chosen = [free[i] for i in decoy_rng.choice(len(free), size=int(decoy_rng.integers(1, 3)), replace=False)]
        hu, _, decoy_cells = _place_lesions(decoy_rng, hu, lungs, lung_mask, chosen, lesion_mask)
    hu = hu + rng.normal(0.0, 8.0, hu.shape)  # quantum noise
    hu = np.clip(np.rint(hu), RESCALE_INTERCEPT, 3071).astype(np.int16)
    return SyntheticChestSlice(
        hu=hu,
        lesion_mask=lesion_mask.astype(np.uint8),
        lung_mask=lung_mask.astype(np.uint8),
        lesion_cells=placed,
        decoy_cells=decoy_cells,
    )


def demo_uid(seed: int, name: str, kind: str, namespace: str = "himix-monai-demo") -> str:
    """A DICOM UID derived from the generator's ``namespace``, ``seed``, case ``name`` and UID ``kind`` (e.g.
    ``"series"``), so that a demo's DICOM files are the same bytes on every run."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[namespace, str(seed), name, kind])


def write_ct_dicom(hu: np.ndarray, path: str | os.PathLike, seed: int, name: str, pixel_spacing: float) -> Any:
    """Write a display-orientation HU slice as a CT Image Storage DICOM file.

    Stored values are ``uint16`` with ``RescaleIntercept`` -1024 and ``RescaleSlope`` 1; the slice is axial
    (``ImageOrientationPatient`` 1/0/0/0/1/0) and centred on the scanner axis. UIDs are derived from
    ``seed`` and ``name`` so the file is reproducible.

    Args:
        hu: int16 HU array (rows, columns), values >= -1024.
        path: the ``.dcm`` file.
        seed: dataset seed (for the UIDs).
        name: case name (for the UIDs and the patient ID).
        pixel_spacing: pixel spacing in mm (rounded to 6 decimals, as written to the file).

    Returns:
        The written ``pydicom.Dataset``.
    """
    if int(hu.min()) < RESCALE_INTERCEPT:
        raise ValueError(f"HU values below {RESCALE_INTERCEPT} cannot be stored as uint16 with that intercept")
    from pydicom.dataset import FileMetaDataset, FileDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    rows, columns = hu.shape
    sop_uid = demo_uid(seed, name, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = demo_uid(seed, name, "study"), demo_uid(seed, name, "series")
    ds.FrameOfReferenceUID = demo_uid(seed, name, "frame")
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = f"Demo^{name}", name, "O", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200301"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "HiMix-MONAI synthetic phantom", "CHEST"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = 1, 1, ""
    ds.KVP, ds.SliceThickness = 120, SLICE_THICKNESS_MM
    pixel_spacing = round(pixel_spacing, 6)  # decimal strings (DS) hold at most 16 characters
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    corner = round(-(rows - 1) / 2.0 * pixel_spacing, 6)
    ds.ImagePositionPatient = [corner, corner, SLICE_POSITION_MM]
    ds.SliceLocation = SLICE_POSITION_MM
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = -300, 1400
    stored = (hu.astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    write_dicom_file(ds, path)
    return ds


def write_dicom_file(dataset: Any, path: str | os.PathLike) -> None:
    """Write a ``pydicom`` dataset with file meta information as a DICOM file, with pydicom 2.4 or 3.

    A thin wrapper: pydicom 3 spells this ``dcmwrite(..., enforce_file_format=True)``, pydicom 2 (which the
    project pins, ``pydicom>=2.4.4,<3``, because MONAI Label's pydicom-seg needs it) ``write_like_original=False``
    with the dataset's endianness and VR encoding set from its transfer syntax.

    Args:
        dataset: a ``pydicom.dataset.FileDataset`` (or ``Dataset``) whose ``file_meta`` names the transfer syntax.
        path: the output file.

    Examples::

        >>> write_dicom_file(ds, "slice.dcm")  # doctest: +SKIP
    """
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
        return
    syntax = dataset.file_meta.TransferSyntaxUID
    dataset.is_little_endian, dataset.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
    pydicom.dcmwrite(path, dataset, write_like_original=False)


def write_display_nifti(display: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> None:
    """Write a display-orientation array (``(row, column)`` or ``(slice, row, column)``) as a NIfTI in MONAI layout
    (the axes reversed: ``(column, row[, slice])``) with ``affine``.

    Args:
        display: 2-D or 3-D array, written with its dtype.
        affine: 4 x 4 RAS affine of the MONAI layout (e.g. :py:func:`himix_monai.data.ct.dicom_slice_affine`).
        path: the ``.nii.gz`` file.
    """
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(display.T), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def split_counts(num: int, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> tuple[int, int, int]:
    """Numbers of training, validation and test cases (validation and test get at least one from 3 cases).

    Examples::

        >>> split_counts(100), split_counts(4)
        ((70, 15, 15), (2, 1, 1))
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    validation, test = (int(round(num * f)) for f in fractions[1:])
    if num >= 3:
        validation, test = max(validation, 1 if fractions[1] else 0), max(test, 1 if fractions[2] else 0)
    return num - validation - test, validation, test


def write_split_datalist(
    out_dir: Path,
    items: Sequence[dict[str, str]],
    description: str,
    settings: dict[str, Any],
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> Path:
    """Write ``out_dir/datalist.json`` (atomically) with ``items`` split in order into training, validation and
    test (:py:func:`split_counts`) and the generator ``settings`` that :py:func:`ensure_generated` compares on reuse.
    The datalist of both demo generators.

    Returns:
        The datalist path.
    """
    n_train, n_val, _ = split_counts(len(items), split_fractions)
    datalist = {
        "description": description,
        "generator": settings,
        "training": list(items[:n_train]),
        "validation": list(items[n_train : n_train + n_val]),
        "test": list(items[n_train + n_val :]),
    }
    return write_datalist(datalist, out_dir / DATALIST_NAME)


def _write_case(out_dir: Path, seed: int, index: int, size: int, decoys: bool) -> dict[str, str]:
    name = f"case_{index:04d}"
    case = synthesize_chest_slice(seed, index, size=size, decoys=decoys)
    paths = {
        "image": out_dir / "images" / f"{name}.nii.gz",
        "label": out_dir / "labels" / f"{name}.nii.gz",
        "image_dicom": out_dir / "dicom" / f"{name}.dcm",
        "lung_mask": out_dir / "lungs" / f"{name}.nii.gz",
    }
    dataset = write_ct_dicom(case.hu, paths["image_dicom"], seed, name, FIELD_OF_VIEW_MM / size)
    affine = dicom_slice_affine(dataset)
    write_display_nifti(case.hu, affine, paths["image"])
    write_display_nifti(case.lesion_mask, affine, paths["label"])
    write_display_nifti(case.lung_mask, affine, paths["lung_mask"])
    findings = describe_chest_findings(case.lesion_mask, lung_mask=case.lung_mask)
    expected = {side: tuple(zone for zone in LUNG_ZONES if (side, zone) in case.lesion_cells) for side in LUNG_SIDES}
    if findings.count != len(case.lesion_cells) or dict(findings.zones) != expected:
        raise RuntimeError(
            f"demo case {name} (seed {seed}): the mask does not show the placed lesions {case.lesion_cells}"
        )
    text = format_chest_report(findings)
    return {
        "image": str(paths["image"]),
        "label": str(paths["label"]),
        "text": text,
        "image_dicom": str(paths["image_dicom"]),
        "lung_mask": str(paths["lung_mask"]),
    }


def generate_demo_dataset(
    out_dir: str | os.PathLike,
    num: int = 100,
    seed: int = 0,
    size: int = 128,
    decoys: bool = True,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> Path:
    """Write the synthetic demo dataset (images, DICOM, masks, reports and datalist) into ``out_dir``.

    Existing files of the same names are overwritten; the datalist is written last (atomically), so its
    presence marks a complete dataset.

    Args:
        out_dir: output folder (created).
        num: number of cases.
        seed: random seed; the same seed gives the same data.
        size: image size in pixels (square, at least :py:data:`MIN_SIZE`).
        decoys: add unreported decoy lesions (see the module docstring).
        split_fractions: training/validation/test fractions, see :py:func:`split_counts`.

    Returns:
        The datalist path.

    Examples::

        >>> datalist = generate_demo_dataset("/tmp/himix_demo", num=20, seed=1)  # doctest: +SKIP
    """
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    out_dir = Path(out_dir).absolute()
    for folder in ("images", "labels", "dicom", "lungs"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    items = [_write_case(out_dir, seed, index, size, decoys) for index in range(num)]
    return write_split_datalist(
        out_dir,
        items,
        "HiMix-MONAI synthetic chest CT demo (image: 2-D NIfTI in HU; image_dicom: same slice as DICOM)",
        demo_settings(num=num, seed=seed, size=size, decoys=decoys),
        split_fractions,
    )


def demo_settings(num: int = 100, seed: int = 0, size: int = 128, decoys: bool = True) -> dict[str, Any]:
    """The generator settings recorded in a demo datalist (key ``"generator"``) and compared on reuse.

    Args:
        num: number of cases.
        seed: random seed.
        size: image size in pixels.
        decoys: decoy lesions on or off.
    """
    return {"num": int(num), "seed": int(seed), "size": int(size), "decoys": bool(decoys)}


class DemoDatasetMismatchError(HiMixError, ValueError):
    """A demo folder holds a datalist made with other settings (or not by the demo generator at all)."""


def _check_demo_settings(datalist: Path, wanted: dict[str, Any]) -> None:
    """Raise :py:class:`DemoDatasetMismatchError` unless ``datalist`` records the generator settings ``wanted``."""
    import json

    try:
        recorded = json.loads(datalist.read_text(encoding="utf-8")).get("generator")
    except (OSError, ValueError, AttributeError) as err:
        raise DemoDatasetMismatchError(
            f"{datalist} exists but cannot be read as a demo datalist ({err}); it is left as it is. "
            "Move it away, or give another dataset_dir (--dataset_dir) for the demo data."
        ) from err
    if recorded == wanted:
        return
    if not isinstance(recorded, dict):
        what = "records no demo generator settings (it was not written by the demo generator)"
    else:
        differing = [key for key, value in wanted.items() if recorded.get(key) != value]
        changed = ", ".join(f"{key}={recorded.get(key)!r} (wanted {wanted[key]!r})" for key in differing)
        what = f"was generated with other settings: {changed}"
    raise DemoDatasetMismatchError(
        f"the demo folder {datalist.parent} {what}; it is not reused in silence and nothing in it is deleted. "
        "Give a new folder (--dataset_dir /path/to/new/folder), or delete this folder to regenerate it here, or "
        "ask for the settings it was made with (--demo_num_cases, --demo_image_size, --demo_decoys, --seed)."
    )


def ensure_generated(
    dataset_dir: str | os.PathLike, settings: dict[str, Any], generate: Callable[[Path], Path]
) -> Path:
    """Return the datalist of a generated dataset in ``dataset_dir``, running ``generate(dataset_dir)`` first if
    there is no datalist yet: the rule of the demo generators.

    Safe when several processes call it at once (e.g. the ranks of a ``torchrun`` job): generation runs under an
    exclusive file lock (``dataset_dir/.himix_demo.lock``, ``filelock``) and the others wait, then find the
    datalist. An existing datalist is reused only when it records ``settings`` under ``"generator"``; otherwise
    :py:class:`DemoDatasetMismatchError` says which settings differ and what to do. Nothing in an existing folder
    is deleted or overwritten.

    Args:
        dataset_dir: the dataset folder (created).
        settings: the generator settings, e.g. :py:func:`demo_settings`.
        generate: writes the dataset into the folder and returns its datalist path.

    Raises:
        DemoDatasetMismatchError: ``dataset_dir`` holds a datalist made with other settings, or not by a generator.
    """
    dataset_dir = Path(dataset_dir).absolute()
    datalist = dataset_dir / DATALIST_NAME
    if datalist.is_file():
        _check_demo_settings(datalist, settings)
        return datalist
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(dataset_dir / ".himix_demo.lock"):
        if datalist.is_file():
            _check_demo_settings(datalist, settings)
            return datalist
        return generate(dataset_dir)


def ensure_demo_dataset(
    dataset_dir: str | os.PathLike, num: int = 100, seed: int = 0, size: int = 128, decoys: bool = True
) -> Path:
    """Return the demo datalist in ``dataset_dir``, generating the dataset first if there is no datalist yet.

    Under a file lock, and reusing an existing datalist only when it was made with these settings: see
    :py:func:`ensure_generated`.

    Args:
        dataset_dir: the dataset folder (created).
        num: number of cases.
        seed: random seed.
        size: image size in pixels.
        decoys: add unreported decoy lesions.

    Returns:
        The datalist path ``dataset_dir/datalist.json``.

    Raises:
        DemoDatasetMismatchError: ``dataset_dir`` holds a datalist made with other settings, or not by the
            demo generator.

    Examples::

        >>> datalist = ensure_demo_dataset("/tmp/himix_demo", num=20)  # doctest: +SKIP
    """
    settings = demo_settings(num=num, seed=seed, size=size, decoys=decoys)
    return ensure_generated(dataset_dir, settings, lambda out: generate_demo_dataset(out, num, seed, size, decoys))
