"""
CT data on MONAI's readers: a DICOM series reader that refuses what MONAI's stacks silently, and CT geometry.

- :py:class:`DicomSeriesReader` is ``monai.data.PydicomReader`` with the checks a DICOM series needs before its
  slices are stacked into one volume (sorted by position, one series, no missing slice); give it to
  ``LoadImage(d)`` (``bundle/configs/inference.json`` does, in ``image_readers`` and ``volume#readers``).
- :py:func:`axial_axis` tells the voxel axis a volume's 2-D slices are taken along (the one closest to
  superior-inferior); :py:class:`~himix_monai.transforms.volume.SliceAxisLastd` moves it last for MONAI's
  ``SliceInferer``.
- :py:func:`dicom_slice_affine` (the RAS affine of a DICOM slice in MONAI layout, used to write the demo data)
  and :py:func:`radiological_view` (a 2-D slice in display orientation).

Hounsfield units: ``PydicomReader`` applies ``RescaleSlope``/``RescaleIntercept`` (to float32) and
``NibabelReader`` applies ``scl_slope``/``scl_inter``: data loaded with ``LoadImage`` is in HU and is scaled to
[0, 1] with training's ``intensity_range`` (``ScaleIntensityRanged``), for pictures, slices and volumes alike.

Array layout: MONAI's. For DICOM, axis 0 runs along the image columns, axis 1 along the rows (``swap_ij``),
axis 2 over the slices; affines map voxel indices to RAS world coordinates in mm.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai.data import PydicomReader
from monai.utils import MetaKeys, ensure_tuple

from himix_monai.errors import HiMixError
from himix_monai.files import dicom_files

__all__ = ["CTReadError", "DicomSeriesReader", "dicom_slice_affine", "axial_axis", "radiological_view"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TOLERANCE = 1e-4
_ADVICE = "put the series' missing files in the folder, or give the series as the scanner stored it"


class CTReadError(HiMixError, ValueError):
    """A CT file or series cannot be used; the message names the file or folder and what to do."""


def _orientation(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(dataset.get("ImageOrientationPatient") or (1, 0, 0, 0, 1, 0), dtype=np.float64)
    return values[:3], values[3:]


def _slice_normal(dataset: Any) -> np.ndarray:
    return np.cross(*_orientation(dataset))


def _with_transfer_syntax(dataset: Any) -> Any:
    """A dataset read with ``force=True`` lacks the file meta's TransferSyntaxUID that decoding its pixels needs:
    set it from the encoding pydicom found (files without preamble are uncompressed little endian)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if isinstance(dataset, list) or "TransferSyntaxUID" in getattr(dataset, "file_meta", {}):
        return dataset
    dataset.ensure_file_meta()
    dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if dataset.is_implicit_VR else ExplicitVRLittleEndian
    return dataset


class DicomSeriesReader(PydicomReader):
    """
    ``monai.data.PydicomReader`` that reads a folder as one DICOM series only when it is one, in slice order.

    Why a subclass: MONAI's series branch (``PydicomReader._combine_dicom_series``, MONAI 1.6) sorts the slices by
    ``InstanceNumber`` (which need not follow position), takes only the z of ``ImagePositionPatient`` for the
    slice spacing, only warns when slices differ in spacing or size, never compares ``SeriesInstanceUID`` and
    spreads the slices evenly whatever the gaps: a series with a missing slice becomes a volume whose later
    slices sit at the wrong positions, silently; a corrupt file in the folder is skipped with a warning. Here,
    for a folder:

    - the files are those of :py:func:`himix_monai.files.dicom_files` (``*.dcm`` and files with the DICOM
      preamble; hidden files and ``DICOMDIR`` left out); one that cannot be read is an error naming it;
    - the slices are sorted by their position along the slice normal (``ImagePositionPatient`` . normal);
    - several ``SeriesInstanceUID`` s, image sizes, orientations or pixel spacings, two slices at one
      position, a slice without position, and a gap between neighbours larger than 1.5 times the median
      step (a missing slice) are :py:class:`CTReadError` naming the folder (and files) and what to do;
    - the affine's slice axis runs from the first to the last slice, as MONAI's (its
      ``lastImagePositionPatient``); HU as MONAI's (``RescaleSlope``/``RescaleIntercept`` of each slice).

    A folder of one DICOM file gives a volume of one slice. Single files are read as by ``PydicomReader``.
    Files without the DICOM preamble (older files) are read when they hold DICOM data, and pixel decoding errors
    name the file. Arguments as ``PydicomReader``.

    Examples::

        from monai.transforms import LoadImage
        volume = LoadImage(reader=DicomSeriesReader(), image_only=True)("/data/series_001")  # (columns, rows, slices)
    """

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs: Any) -> Any:
        """Read a file as ``PydicomReader`` does; a series folder is read and checked in :py:meth:`get_data`.

        Why later: ``LoadImage`` with user-given readers treats an error in ``read`` as "try the next reader", and
        MONAI's default ``PydicomReader`` would then stack the refused series after all.

        Args:
            data: a DICOM file, a series folder or a list of files.
            kwargs: passed to ``pydicom.dcmread``.
        """
        names = ensure_tuple(data)
        if len(names) != 1 or not Path(names[0]).is_dir():
            import pydicom

            try:
                return super().read(data, **kwargs)
            except pydicom.errors.InvalidDicomError:  # no DICOM preamble (older files): read it if it is DICOM
                return _with_transfer_syntax(super().read(data, **{**kwargs, "force": True}))
        self._series_kwargs = {**self.kwargs, **kwargs}
        return Path(names[0])

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        """The image array and meta data, as ``PydicomReader.get_data``; a series folder is read and checked first.

        Raises:
            CTReadError: naming the folder or file, for a folder without DICOM files, an unreadable file or a
                folder that is not one complete series (see the class description).
        """
        if isinstance(img, Path):
            img = self._read_series(img, getattr(self, "_series_kwargs", self.kwargs))
        return super().get_data(img)

    def _read_series(self, folder: Path, kwargs: dict) -> list:
        import pydicom

        files = dicom_files(folder)
        if not files:
            raise CTReadError(f"{folder}: no DICOM files in the folder (a DICOM series folder is expected)")
        datasets = []
        for path in files:
            try:
                try:
                    datasets.append(pydicom.dcmread(path, **kwargs))
                except pydicom.errors.InvalidDicomError:  # a .dcm file without the preamble: read it if it is one
                    forced = pydicom.dcmread(path, **{**kwargs, "force": True})
                    if "PixelData" not in forced and "Rows" not in forced:
                        raise ValueError("no DICOM preamble and no image attributes") from None
                    datasets.append(_with_transfer_syntax(forced))
            except Exception as err:  # pydicom raises many types for truncated or garbled files
                raise CTReadError(
                    f"{path}: not a valid DICOM file or corrupt ({err}); remove it from {folder}"
                ) from err
        ordered = self._check_series(list(zip(datasets, files)), folder)
        self.has_series = True
        self.filenames = [[str(path) for _, path in ordered]]
        return [dataset for dataset, _ in ordered]

    @staticmethod
    def _check_series(slices: list[tuple[Any, Path]], folder: Path) -> list[tuple[Any, Path]]:
        """The slices sorted along the slice normal; :py:class:`CTReadError` when they are not one complete series."""
        for dataset, path in slices:
            if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                raise CTReadError(f"{path}: DICOM file has no pixel data; remove it from {folder}")
        uids: dict[str, Path] = {}
        for dataset, path in slices:
            uids.setdefault(str(dataset.get("SeriesInstanceUID", "")), path)
        if len(uids) > 1:
            listing = "; ".join(f"{uid or '<none>'} (e.g. {path.name})" for uid, path in uids.items())
            raise CTReadError(
                f"{folder}: mixed DICOM series, {len(uids)} SeriesInstanceUIDs: {listing}; "
                "put each series in its own folder"
            )
        if len(slices) == 1:
            return slices
        first, first_path = slices[0]
        for dataset, path in slices:
            for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
                if keyword not in dataset:
                    raise CTReadError(f"{path}: no {keyword}, cannot place the slice in the series of {folder}")
            checks = {
                "image size (Rows, Columns)": ((dataset.Rows, dataset.Columns), (first.Rows, first.Columns)),
                "ImageOrientationPatient": (_orientation(dataset), _orientation(first)),
                "PixelSpacing": (dataset.get("PixelSpacing") or (1, 1), first.get("PixelSpacing") or (1, 1)),
            }
            for what, (value, reference) in checks.items():
                if not np.allclose(np.hstack(value).astype(float), np.hstack(reference).astype(float), atol=_TOLERANCE):
                    raise CTReadError(
                        f"{folder}: mixed DICOM series, {path.name} differs from {first_path.name} in {what}; "
                        "put each series in its own folder"
                    )
        normal = _slice_normal(first)
        located = sorted(
            ((float(np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ normal), ds, path) for ds, path in slices),
            key=lambda entry: entry[0],
        )
        locations = np.array([entry[0] for entry in located])
        gaps = np.diff(locations)
        same = np.flatnonzero(gaps < _TOLERANCE)
        if same.size:
            first_name, second_name = located[same[0]][2].name, located[same[0] + 1][2].name
            raise CTReadError(
                f"{folder}: mixed DICOM series, {first_name} and {second_name} have the same slice position; "
                "put each series in its own folder"
            )
        step = float(np.median(gaps))
        missing = np.flatnonzero(gaps > 1.5 * step)
        if missing.size:  # stacking the others evenly would put every later slice in the wrong place
            k = int(missing[0])
            raise CTReadError(
                f"{folder}: missing slice in the DICOM series: {located[k][2].name} and {located[k + 1][2].name} "
                f"(positions {locations[k]:g} and {locations[k + 1]:g} mm) are {gaps[k]:g} mm apart where the median "
                f"step is {step:g} mm ({missing.size} such gap(s)); {_ADVICE}"
            )
        if np.ptp(gaps) > 0.01 * step + _TOLERANCE:
            warnings.warn(f"{folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm), using the mean")
        return [(ds, path) for _, ds, path in located]

    def _combine_dicom_series(self, data: Any, filenames: Sequence[Any]) -> tuple[np.ndarray, dict]:
        """Stack the slices in the order :py:meth:`read` checked (MONAI's sorts by ``InstanceNumber``)."""
        arrays = [self._get_array_data(dataset, name) for dataset, name in zip(data, filenames)]
        meta = self._get_meta_dict(data[0])
        spacing = [float(v) for v in (data[0].get("PixelSpacing") or (1.0, 1.0))]
        if len(arrays) > 1:
            meta["lastImagePositionPatient"] = np.asarray(data[-1].ImagePositionPatient, dtype=np.float64)
            positions = [np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in (data[0], data[-1])]
            spacing.append(float(np.linalg.norm(positions[1] - positions[0])) / (len(arrays) - 1))
        meta["spacing"] = np.asarray(spacing)
        meta[MetaKeys.SPATIAL_SHAPE] = arrays[0].shape + (len(arrays),)
        return np.stack(arrays, axis=-1), meta

    def _get_array_data(self, img: Any, filename: Any) -> Any:
        """MONAI's pixel data in HU, with decoding errors naming the file."""
        try:
            return super()._get_array_data(img, filename)
        except Exception as err:  # missing decoder plugins, truncated pixel data, ...
            raise CTReadError(f"{filename}: cannot decode the DICOM pixel data ({err}); replace the file") from err


def dicom_slice_affine(dataset: Any) -> np.ndarray:
    """The RAS voxel-to-world affine of a DICOM slice in MONAI layout (axis 0 = image column, axis 1 = row).

    Built from ``ImagePositionPatient``, ``ImageOrientationPatient`` and ``PixelSpacing`` as
    ``PydicomReader`` builds it; along the slice normal it puts ``SpacingBetweenSlices`` or ``SliceThickness``
    (MONAI: 1 mm). Used to write NIfTI copies of DICOM slices (the demo data).

    Args:
        dataset: a ``pydicom.Dataset``.

    Returns:
        A 4 x 4 float64 affine.
    """
    row_direction, column_direction = _orientation(dataset)
    row_spacing, column_spacing = (float(value) for value in (dataset.get("PixelSpacing") or (1.0, 1.0)))
    thickness = dataset.get("SpacingBetweenSlices") or dataset.get("SliceThickness") or 1.0
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * column_spacing  # along a row: increasing column index
    affine_lps[:3, 1] = column_direction * row_spacing  # down a column: increasing row index
    affine_lps[:3, 2] = _slice_normal(dataset) * float(thickness)
    affine_lps[:3, 3] = np.asarray(dataset.get("ImagePositionPatient") or (0.0, 0.0, 0.0), dtype=np.float64)
    return _LPS_TO_RAS @ affine_lps


def axial_axis(affine: Any) -> int:
    """The voxel axis closest to superior-inferior (2 when none is): the axis a volume's 2-D slices are taken along.

    Args:
        affine: the 4 x 4 voxel-to-world affine (array or tensor).

    Examples::

        >>> axial_axis(np.eye(4)), axial_axis(np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]))
        (2, 0)
    """
    import nibabel as nib

    matrix = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=np.float64)
    codes = nib.orientations.aff2axcodes(matrix)
    return next((axis for axis, code in enumerate(codes) if code in ("S", "I")), 2)


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
