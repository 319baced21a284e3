"""
CT images as 2-D model inputs: Hounsfield units, intensity windows, DICOM series and NIfTI volumes.

The HiMix network segments 2-D slices. This module turns CT data into such slices and predictions back
into volumes:

- :py:func:`hu_window` maps Hounsfield units (HU) to [0, 1] through a window: a named preset from
  :py:data:`WINDOW_PRESETS` (``"lung"`` by default: -1000..400 HU), a ``(low, high)`` pair or a
  ``{"center": c, "width": w}`` mapping (see :py:func:`resolve_window`);
- :py:func:`read_dicom_slice`, :py:func:`read_dicom_series`, :py:func:`read_nifti_volume` and the
  dispatchers :py:func:`read_ct_volume` / :py:func:`read_ct_slice` read HU (rescale slope and intercept
  applied exactly once) together with the voxel-to-world affine into a :py:class:`CTVolume`;
- :py:func:`volume_to_slices` yields the 2-D slices, :py:func:`slices_to_nifti` stacks per-slice predictions
  back into a ``uint8`` NIfTI mask carrying the source geometry, so predictions land on the same voxels in
  world space as the input.

Array layout. Volumes follow MONAI's reader conventions so that this module and
``monai.transforms.LoadImage`` agree voxel for voxel: for DICOM, axis 0 runs along the image columns and
axis 1 along the image rows (the transpose of ``pixel_array``, as ``PydicomReader(swap_ij=True)``), axis 2
over the slices sorted by position, and the affine maps voxel indices to RAS world coordinates in mm
(``PydicomReader(affine_lps_to_ras=True)``, ``NibabelReader``). NIfTI arrays are kept as stored.

MONAI's ``PydicomReader`` already applies ``RescaleSlope``/``RescaleIntercept`` (to float32), and
``NibabelReader`` applies ``scl_slope``/``scl_inter`` (via nibabel): data loaded with
``LoadImaged`` is in HU and must not be rescaled again. ``pydicom``'s ``Dataset.pixel_array`` holds the raw
stored values, which :py:func:`dicom_hu` rescales once.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from himix_monai.files import atomic_path, dicom_files, full_suffix, is_nifti
from himix_monai.errors import HiMixError

__all__ = [
    "WINDOW_PRESETS",
    "DEFAULT_WINDOW",
    "WindowLike",
    "CTReadError",
    "CTVolume",
    "window_from_center_width",
    "resolve_window",
    "hu_window",
    "read_dicom_dataset",
    "dicom_hu",
    "dicom_slice_affine",
    "read_dicom_slice",
    "read_dicom_series",
    "axial_axis",
    "read_nifti_volume",
    "read_ct_volume",
    "read_ct_slice",
    "volume_to_slices",
    "slices_to_nifti",
    "radiological_view",
]

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-1000.0, 400.0),
    "mediastinum": (-135.0, 215.0),
    "abdomen": (-150.0, 250.0),
    "bone": (-500.0, 1300.0),
}
"""Named CT windows as (low, high) HU: lung -1000..400 (this project's default, covers air to soft tissue),
mediastinum (center 40, width 350), abdomen (center 50, width 400), bone (center 400, width 1800)."""

DEFAULT_WINDOW = "lung"
"""The window used when none is given."""

WindowLike = Union[str, Sequence[float], Mapping[str, float]]
"""A preset name, a ``(low, high)`` pair in HU or a ``{"center": c, "width": w}`` mapping."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY_TOLERANCE = 1e-4


class CTReadError(HiMixError, ValueError):
    """A CT file, series or prediction cannot be used; the message names the file."""


@dataclass
class CTVolume:
    """CT data in Hounsfield units with its geometry.

    Args:
        hu: float32 HU array of 3 spatial dimensions (a single slice has one slice along ``slice_axis``).
        affine: 4 x 4 voxel-to-RAS-world affine (mm).
        source: the file or folder it was read from.
        slice_axis: the array axis the 2-D slices are taken along (the axial one).
        source_ndim: number of dimensions of the stored image (2 for a 2-D NIfTI slice).
        header: the NIfTI header of a NIfTI source, else None.
        files: the DICOM files in slice order, for DICOM sources.
    """

    hu: np.ndarray
    affine: np.ndarray
    source: str
    slice_axis: int = 2
    source_ndim: int = 3
    header: Any = None
    files: tuple[str, ...] = ()

    @property
    def num_slices(self) -> int:
        """Number of 2-D slices."""
        return int(self.hu.shape[self.slice_axis])

    @property
    def slice_shape(self) -> tuple[int, ...]:
        """Shape of one 2-D slice."""
        return tuple(size for axis, size in enumerate(self.hu.shape) if axis != self.slice_axis)


def window_from_center_width(center: float, width: float) -> tuple[float, float]:
    """The (low, high) HU bounds of a window given by its center (level) and width.

    Examples::

        >>> window_from_center_width(-600, 1500)
        (-1350.0, 150.0)
    """
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise ValueError(f"a CT window needs a finite center and a positive width, got center={center} width={width}")
    return float(center - width / 2.0), float(center + width / 2.0)


def resolve_window(window: WindowLike = DEFAULT_WINDOW) -> tuple[float, float]:
    """Validate a window and return it as (low, high) HU.

    Args:
        window: a name from :py:data:`WINDOW_PRESETS` (case-insensitive), a ``(low, high)`` pair with
            ``low < high``, or a mapping with ``center`` (or ``level``) and ``width``.

    Raises:
        ValueError: for an unknown preset, a non-finite bound, ``low >= high`` or a non-positive width.

    Examples::

        >>> resolve_window("lung"), resolve_window((-160, 240)), resolve_window({"center": 40, "width": 400})
        ((-1000.0, 400.0), (-160.0, 240.0), (-160.0, 240.0))
    """
    if isinstance(window, str):
        key = window.strip().lower()
        if key not in WINDOW_PRESETS:
            raise ValueError(f"unknown CT window preset {window!r}, expected one of {sorted(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[key]
    if isinstance(window, Mapping):
        center = window.get("center", window.get("level"))
        if center is None or "width" not in window:
            raise ValueError(f"a CT window mapping needs 'center' (or 'level') and 'width', got {dict(window)}")
        return window_from_center_width(float(center), float(window["width"]))
    try:
        low, high = (float(value) for value in window)
    except (TypeError, ValueError) as err:
        raise ValueError(f"a CT window must be a preset name, (low, high) or center/width, got {window!r}") from err
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"a CT window needs finite bounds with low < high, got ({low}, {high})")
    return low, high


def hu_window(array: Any, window: WindowLike = DEFAULT_WINDOW) -> np.ndarray:
    """Map HU values linearly from the window's (low, high) to (0, 1), clipping outside values.

    Args:
        array: HU values (NumPy array, torch tensor or array-like).
        window: see :py:func:`resolve_window`.

    Returns:
        float32 array of the same shape, in [0, 1].

    Examples::

        >>> hu_window(np.array([-1100.0, -1000.0, -300.0, 400.0]))
        array([0. , 0. , 0.5, 1. ], dtype=float32)
    """
    low, high = resolve_window(window)
    values = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _dcmread(path: Path, force: bool) -> Any:
    import pydicom

    return pydicom.dcmread(path, force=force)


def read_dicom_dataset(path: str | os.PathLike) -> Any:
    """Read one DICOM file and check it holds a single 2-D grey-level image.

    Files without the DICOM preamble are retried with ``force=True`` and accepted when they hold an image.

    Args:
        path: the DICOM file.

    Returns:
        The ``pydicom.Dataset``.

    Raises:
        CTReadError: naming the file, when it is missing, not DICOM or corrupt, has no pixel data, is
            multi-frame (a 3-D volume where a 2-D slice is expected) or has colour samples.
    """
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise CTReadError(f"{path}: DICOM file not found")
    try:
        try:
            dataset = _dcmread(path, force=False)
        except InvalidDicomError:
            dataset = _dcmread(path, force=True)
            if "PixelData" not in dataset and "Rows" not in dataset:
                raise InvalidDicomError("no DICOM header (preamble and 'DICM' prefix) and no image attributes")
    except Exception as err:  # pydicom raises many types for truncated or garbled files
        raise CTReadError(f"{path}: not a valid DICOM file or corrupt: {err}") from err
    if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise CTReadError(f"{path}: DICOM file has no pixel data")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise CTReadError(f"{path}: multi-frame DICOM ({frames} frames, a 3-D volume) where a 2-D slice is expected")
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise CTReadError(
            f"{path}: DICOM image has {samples} samples per pixel (colour), expected a grey-level CT slice"
        )
    return dataset


def _float_tag(dataset: Any, keyword: str, default: float) -> float:
    value = dataset.get(keyword)
    return default if value is None or value == "" else float(value)


def dicom_hu(dataset: Any, path: str | os.PathLike = "<dataset>") -> np.ndarray:
    """The HU values of a DICOM slice in display layout ``(rows, columns)``.

    The stored values (``pixel_array``) are rescaled exactly once: with the Modality LUT Sequence when
    present, else ``stored * RescaleSlope + RescaleIntercept`` (slope 1 and intercept 0 when absent).

    Args:
        dataset: a ``pydicom.Dataset`` of a single 2-D slice (see :py:func:`read_dicom_dataset`).
        path: its file, for error messages.

    Raises:
        CTReadError: naming the file, when the pixel data cannot be decoded or is not 2-D.
    """
    try:
        stored = dataset.pixel_array
    except Exception as err:  # missing decoder plugins, truncated pixel data, ...
        raise CTReadError(f"{path}: cannot decode the DICOM pixel data: {err}") from err
    if stored.ndim != 2:
        raise CTReadError(f"{path}: DICOM pixel data has shape {stored.shape} where a 2-D slice is expected")
    if "ModalityLUTSequence" in dataset:
        try:
            from pydicom.pixels import apply_modality_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_modality_lut
        return np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)
    slope = _float_tag(dataset, "RescaleSlope", 1.0)
    intercept = _float_tag(dataset, "RescaleIntercept", 0.0)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _orientation(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(dataset.get("ImageOrientationPatient") or (1, 0, 0, 0, 1, 0), dtype=np.float64)
    return values[:3], values[3:]


def _slice_normal(dataset: Any) -> np.ndarray:
    row_direction, column_direction = _orientation(dataset)
    return np.cross(row_direction, column_direction)


def dicom_slice_affine(dataset: Any, slice_step: Sequence[float] | None = None) -> np.ndarray:
    """The RAS voxel-to-world affine of a DICOM slice in MONAI layout (axis 0 = image column, axis 1 = row).

    Built from ``ImagePositionPatient``, ``ImageOrientationPatient`` and ``PixelSpacing`` (DICOM LPS, then
    converted to RAS); the matrix ``monai.data.PydicomReader`` gives for a series. For a single slice, MONAI
    puts 1 mm along the slice normal where this uses the slice spacing or thickness (the in-plane columns and
    the origin are the same).

    Args:
        dataset: a ``pydicom.Dataset``.
        slice_step: LPS vector (mm) from one slice to the next of a series; by default the slice normal
            times ``SpacingBetweenSlices``, ``SliceThickness`` or 1.

    Returns:
        A 4 x 4 float64 affine.
    """
    row_direction, column_direction = _orientation(dataset)
    row_spacing, column_spacing = (float(value) for value in (dataset.get("PixelSpacing") or (1.0, 1.0)))
    position = np.asarray(dataset.get("ImagePositionPatient") or (0.0, 0.0, 0.0), dtype=np.float64)
    if slice_step is None:
        thickness = _float_tag(dataset, "SpacingBetweenSlices", 0.0) or _float_tag(dataset, "SliceThickness", 1.0)
        step = _slice_normal(dataset) * (thickness or 1.0)
    else:
        step = np.asarray(slice_step, dtype=np.float64)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * column_spacing  # along a row: increasing column index
    affine_lps[:3, 1] = column_direction * row_spacing  # down a column: increasing row index
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = position
    return _LPS_TO_RAS @ affine_lps


def read_dicom_slice(path: str | os.PathLike) -> CTVolume:
    """Read one DICOM slice as a single-slice :py:class:`CTVolume` (HU array of shape (columns, rows, 1)).

    Args:
        path: the DICOM file.

    Raises:
        CTReadError: see :py:func:`read_dicom_dataset` and :py:func:`dicom_hu`.
    """
    dataset = read_dicom_dataset(path)
    if "ImagePositionPatient" not in dataset or "ImageOrientationPatient" not in dataset:
        warnings.warn(f"{path}: no ImagePositionPatient/ImageOrientationPatient, assuming an axial slice at the origin")
    hu = dicom_hu(dataset, path).T[:, :, None]
    return CTVolume(
        hu=np.ascontiguousarray(hu), affine=dicom_slice_affine(dataset), source=str(path), files=(str(path),)
    )


def _check_same_series(datasets: Sequence[tuple[Path, Any]], folder: Path) -> None:
    """Raise :py:class:`CTReadError` when the slices do not form one consistent series."""
    by_uid: dict[str, Path] = {}
    for path, dataset in datasets:
        by_uid.setdefault(str(dataset.get("SeriesInstanceUID", "")), path)
    if len(by_uid) > 1:
        listing = "; ".join(f"{uid or '<none>'} (e.g. {path.name})" for uid, path in by_uid.items())
        raise CTReadError(f"{folder}: mixed DICOM series, {len(by_uid)} SeriesInstanceUIDs: {listing}")
    first_path, first = datasets[0]
    for path, dataset in datasets[1:]:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
            if keyword not in dataset:
                raise CTReadError(f"{path}: no {keyword}, cannot place the slice in the series of {folder}")
        checks = {
            "image size (Rows, Columns)": ((dataset.Rows, dataset.Columns), (first.Rows, first.Columns)),
            "ImageOrientationPatient": (_orientation(dataset), _orientation(first)),
            "PixelSpacing": (dataset.get("PixelSpacing") or (1, 1), first.get("PixelSpacing") or (1, 1)),
        }
        for what, (value, reference) in checks.items():
            same = np.allclose(np.hstack(value).astype(float), np.hstack(reference).astype(float), atol=_GEOMETRY_TOLERANCE)
            if not same:
                raise CTReadError(
                    f"{folder}: mixed DICOM series, {path.name} differs from {first_path.name} in {what}"
                )


def _sort_slices(datasets: Sequence[tuple[Path, Any]], folder: Path) -> list[tuple[Path, Any]]:
    """Slices ordered by position along the slice normal (then InstanceNumber); duplicates are an error."""
    normal = _slice_normal(datasets[0][1])

    def key(entry: tuple[Path, Any]) -> tuple[float, int]:
        position = np.asarray(entry[1].ImagePositionPatient, dtype=np.float64)
        return float(position @ normal), int(entry[1].get("InstanceNumber") or 0)

    ordered = sorted(datasets, key=key)
    locations = np.array([key(entry)[0] for entry in ordered])
    gaps = np.diff(locations)
    duplicate = np.flatnonzero(np.abs(gaps) < _GEOMETRY_TOLERANCE)
    if duplicate.size:
        first, second = ordered[duplicate[0]][0].name, ordered[duplicate[0] + 1][0].name
        raise CTReadError(f"{folder}: mixed DICOM series, {first} and {second} have the same slice position")
    missing = np.flatnonzero(gaps > 1.5 * gaps.min()) if gaps.size > 1 else np.array([], dtype=int)
    if missing.size:  # a missing slice: spreading the others evenly would put every later slice in the wrong place
        k = int(missing[0])
        (first, before), (second, after) = ordered[k], ordered[k + 1]
        raise CTReadError(
            f"{folder}: missing slice in the DICOM series: {first.name} and {second.name} (positions {key(ordered[k])[0]:g} "
            f"and {key(ordered[k + 1])[0]:g} mm) are {gaps[k]:g} mm apart where the closest slices are {gaps.min():g} mm "
            f"apart ({missing.size} such gap(s)); put the missing files in the folder or take the series as it is "
            "stored from the scanner"
        )
    if gaps.size > 1 and np.ptp(gaps) > 0.01 * float(np.median(gaps)) + _GEOMETRY_TOLERANCE:
        warnings.warn(
            f"{folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm), using the mean spacing"
        )
    return ordered


def read_dicom_series(folder: str | os.PathLike) -> CTVolume:
    """Read a folder holding one DICOM series as a :py:class:`CTVolume` of shape (columns, rows, slices).

    Slices are sorted by ``ImagePositionPatient`` along the slice normal (``InstanceNumber`` breaks ties),
    each is rescaled to HU with its own slope and intercept, and the affine's slice axis runs from the first
    to the last slice position. Hidden files, ``DICOMDIR`` and non-DICOM files without a ``.dcm`` suffix are
    skipped; a ``.dcm`` file that cannot be read is an error.

    Args:
        folder: the series folder.

    Raises:
        CTReadError: naming the folder or file, for a missing/empty folder, a corrupt file, a file without
            pixel data, mixed series (several SeriesInstanceUIDs, image sizes, orientations, spacings or
            repeated positions) or missing geometry tags.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CTReadError(f"{folder}: DICOM series folder not found")
    files = dicom_files(folder)
    if not files:
        raise CTReadError(f"{folder}: no DICOM files in the folder")
    datasets = [(path, read_dicom_dataset(path)) for path in files]
    if len(datasets) == 1:
        return read_dicom_slice(files[0])
    first_path, first = datasets[0]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
        if keyword not in first:
            raise CTReadError(f"{first_path}: no {keyword}, cannot place the slice in the series of {folder}")
    _check_same_series(datasets, folder)
    ordered = _sort_slices(datasets, folder)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in ordered])
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    hu = np.stack([dicom_hu(dataset, path).T for path, dataset in ordered], axis=-1)
    return CTVolume(
        hu=np.ascontiguousarray(hu),
        affine=dicom_slice_affine(ordered[0][1], slice_step=step),
        source=str(folder),
        files=tuple(str(path) for path, _ in ordered),
    )


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the superior-inferior direction (2 when unclear): the slice axis of a volume.

    Args:
        affine: the 4x4 voxel-to-world affine.
    """
    import nibabel as nib

    codes = nib.orientations.aff2axcodes(affine)
    for axis, code in enumerate(codes):
        if code in ("S", "I"):
            return axis
    return 2


def read_nifti_volume(path: str | os.PathLike) -> CTVolume:
    """Read a NIfTI image (2-D slice or 3-D volume) as a :py:class:`CTVolume` in HU.

    nibabel applies the header's ``scl_slope``/``scl_inter`` once; the array is kept in its stored layout and
    the slices are taken along the voxel axis closest to superior-inferior. A 2-D image becomes one slice.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Raises:
        CTReadError: naming the file, when it is missing, unreadable or has more than 3 spatial dimensions.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise CTReadError(f"{path}: NIfTI file not found")
    try:
        image = nib.load(str(path))
        hu = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:  # nibabel raises several types for corrupt files
        raise CTReadError(f"{path}: cannot read NIfTI image: {err}") from err
    source_ndim = hu.ndim
    while hu.ndim > 3 and hu.shape[-1] == 1:
        hu = hu[..., 0]
    if hu.ndim == 2:
        hu = hu[:, :, None]
    if hu.ndim != 3:
        raise CTReadError(f"{path}: NIfTI image of shape {image.shape} is not a 2-D slice or a 3-D volume")
    affine = np.asarray(image.affine, dtype=np.float64)
    slice_axis = 2 if source_ndim == 2 else axial_axis(affine)
    return CTVolume(
        hu=hu, affine=affine, source=str(path), slice_axis=slice_axis, source_ndim=min(source_ndim, 3),
        header=image.header.copy(),
    )


def read_ct_volume(path: str | os.PathLike, allow_single_slice: bool = False) -> CTVolume:
    """Read a CT volume: a DICOM series folder, a NIfTI file or (with ``allow_single_slice``) a DICOM file.

    Args:
        path: a folder (DICOM series), a ``.nii``/``.nii.gz`` file or a DICOM file.
        allow_single_slice: accept data holding a single 2-D slice.

    Raises:
        CTReadError: naming the file, see the readers; also for a single 2-D slice where a 3-D volume is
            expected (unless ``allow_single_slice``).
    """
    path = Path(path)
    if path.is_dir():
        volume = read_dicom_series(path)
    elif is_nifti(path):
        volume = read_nifti_volume(path)
    else:
        volume = read_dicom_slice(path)
    if volume.num_slices == 1 and not allow_single_slice:
        raise CTReadError(
            f"{path}: a single 2-D slice where a 3-D volume is expected "
            "(use read_ct_slice, or allow_single_slice=True)"
        )
    return volume


def read_ct_slice(path: str | os.PathLike) -> CTVolume:
    """Read a single 2-D CT slice (DICOM file, 2-D NIfTI or one-slice volume) as a one-slice :py:class:`CTVolume`.

    The 2-D HU array is ``volume.hu[..., 0]`` (or ``next(volume_to_slices(volume))``).

    Args:
        path: a DICOM file, a ``.nii``/``.nii.gz`` file, or a folder holding one DICOM file.

    Raises:
        CTReadError: naming the file, see the readers; also for a 3-D volume (several slices) where a
            2-D slice is expected.
    """
    path = Path(path)
    volume = read_ct_volume(path, allow_single_slice=True)
    if volume.num_slices != 1:
        raise CTReadError(
            f"{path}: a 3-D volume of shape {volume.hu.shape} ({volume.num_slices} slices) "
            "where a 2-D slice is expected"
        )
    return volume


def volume_to_slices(
    volume: CTVolume, window: WindowLike | None = None, add_channel: bool = False
) -> Iterator[np.ndarray]:
    """Yield the 2-D slices of a volume in slice order, as model inputs.

    Args:
        volume: the volume.
        window: when given, slices are mapped to [0, 1] with :py:func:`hu_window`; otherwise they are in HU.
        add_channel: yield ``(1, H, W)`` arrays (channel first) instead of ``(H, W)``.

    Yields:
        float32 arrays of shape ``volume.slice_shape`` (with a leading channel when ``add_channel``).

    Examples::

        >>> volume = read_ct_volume("series_folder")  # doctest: +SKIP
        >>> inputs = np.stack(list(volume_to_slices(volume, "lung", add_channel=True)))  # doctest: +SKIP
    """
    for index in range(volume.num_slices):
        plane = np.take(volume.hu, index, axis=volume.slice_axis)
        plane = hu_window(plane, window) if window is not None else plane.astype(np.float32, copy=False)
        yield plane[None] if add_channel else plane


def _prediction_plane(prediction: Any, expected: tuple[int, ...], index: int, threshold: float) -> np.ndarray:
    array = np.asarray(prediction.detach().cpu() if hasattr(prediction, "detach") else prediction)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.shape != expected:
        raise CTReadError(f"prediction slice {index} has shape {array.shape}, expected {expected}")
    return array if array.dtype == bool else array > threshold


def slices_to_nifti(
    pred_slices: Iterable[Any],
    reference: CTVolume | str | os.PathLike,
    out_path: str | os.PathLike,
    threshold: float = 0.5,
) -> Path:
    """Stack per-slice 2-D predictions into a ``uint8`` 0/1 NIfTI mask with the reference's geometry.

    The inverse of :py:func:`volume_to_slices`: slice ``k`` of the predictions lands on slice ``k`` of the
    reference, with the reference affine (for DICOM, the one computed from ``ImagePositionPatient``,
    ``ImageOrientationPatient`` and ``PixelSpacing``; for NIfTI, the source affine and header), so each
    predicted voxel has the same world position as the input voxel it was predicted from.

    Args:
        pred_slices: one 2-D prediction per slice, shape ``reference.slice_shape`` (a leading channel of 1 is
            dropped); NumPy arrays or torch tensors, binarized as ``> threshold`` unless boolean.
        reference: the :py:class:`CTVolume` the slices came from, or its path (read with
            :py:func:`read_ct_volume`, single slices allowed).
        out_path: the ``.nii``/``.nii.gz`` file to write (atomically; parent folders are created).
        threshold: foreground threshold for non-boolean predictions (probabilities or 0/1 labels).

    Returns:
        The path written.

    Raises:
        CTReadError: when the number or shape of the slices does not match the reference.
    """
    import nibabel as nib

    volume = reference if isinstance(reference, CTVolume) else read_ct_volume(reference, allow_single_slice=True)
    planes = [
        _prediction_plane(prediction, volume.slice_shape, index, threshold)
        for index, prediction in enumerate(pred_slices)
    ]
    if len(planes) != volume.num_slices:
        raise CTReadError(f"{volume.source}: got {len(planes)} prediction slices for {volume.num_slices} slices")
    mask = np.stack(planes, axis=volume.slice_axis).astype(np.uint8)
    if volume.source_ndim == 2:
        mask = mask[:, :, 0]
    if volume.header is not None:
        header = volume.header.copy()
        header.set_data_dtype(np.uint8)
        image = nib.Nifti1Image(mask, volume.affine, header=header)
    else:
        image = nib.Nifti1Image(mask, volume.affine)
        image.set_qform(volume.affine, code=1)
        image.set_sform(volume.affine, code=1)
    image.header.set_slope_inter(1.0, 0.0)
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=full_suffix(out_path)) as temp:
        nib.save(image, str(temp))
    return out_path


def radiological_view(slice_array: Any, affine: Any | None = None) -> np.ndarray:
    """A 2-D slice in display orientation (rows top to bottom, patient's right on the image left).

    Inverse of how MONAI's readers lay out 2-D images (axis 0 = image column, axis 1 = image row). With a
    geometric ``affine`` the result follows the radiological convention: columns run toward the patient's
    left, rows toward posterior (axial) or inferior (coronal). Without an affine, or with the identity
    (no geometry, as MONAI gives PNG images), the array is just transposed.

    Args:
        slice_array: 2-D array in MONAI layout.
        affine: its voxel-to-RAS affine (3 x 3 or 4 x 4), optional.

    Returns:
        The 2-D display array (a view where possible).
    """
    import nibabel as nib

    array = np.asarray(slice_array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {array.shape}")
    if affine is None:
        return array.T
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape == (3, 3):  # 2-D affine: embed it in 3-D with an identity third axis
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = matrix[:2, :2], matrix[:2, 2]
        matrix = full
    if np.allclose(matrix, np.eye(4)):
        return array.T
    codes = nib.orientations.aff2axcodes(matrix)[:2]
    if not any(code in ("L", "R") for code in codes):
        return array.T  # sagittal plane: no left/right axis, keep MONAI's layout
    column_axis = 0 if codes[0] in ("L", "R") else 1
    row_axis = 1 - column_axis
    view = array.T if column_axis == 0 else array
    if codes[column_axis] == "R":
        view = view[:, ::-1]
    if codes[row_axis] in ("A", "S"):
        view = view[::-1, :]
    return view
