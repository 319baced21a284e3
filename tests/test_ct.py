"""Tests for himix_monai.data.ct and himix_monai.transforms.ct."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from himix_monai.data.ct import (
    CTReadError,
    hu_window,
    radiological_view,
    read_ct_slice,
    read_ct_volume,
    read_dicom_series,
    read_dicom_slice,
    read_nifti_volume,
    resolve_window,
    slices_to_nifti,
    volume_to_slices,
    window_from_center_width,
)
from himix_monai.data.demo import write_dicom_file
from himix_monai.transforms.ct import CTWindow, CTWindowd, EnsureSingleSliced

ROW_DIR, COLUMN_DIR = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def _write_dicom(
    path,
    stored,
    slope=1.0,
    intercept=-1024.0,
    position=(-100.0, -80.0, 30.0),
    orientation=(1, 0, 0, 0, 1, 0),
    spacing=(0.8, 0.6),
    series_uid="1.2.3.4",
    instance=1,
    pixel_data=True,
):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, instance
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(position), list(orientation)
    ds.PixelSpacing, ds.SliceThickness = list(spacing), 2.0
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixel_data:
        ds.PixelData = stored.astype(np.uint16).tobytes()
    write_dicom_file(ds, path)
    return ds


def _stored_image(rows=6, columns=5, offset=0):
    return (np.arange(rows * columns).reshape(rows, columns) * 37 + offset).astype(np.uint16)


def _assert_same_slice_geometry(monai_affine, affine):
    """Same in-plane axes and origin (the slice-normal column of a single slice is free)."""
    assert np.allclose(monai_affine[:, [0, 1, 3]], affine[:, [0, 1, 3]])


def test_window_resolution_and_values():
    assert resolve_window("lung") == (-1000.0, 400.0)
    assert resolve_window("Mediastinum") == (-135.0, 215.0)
    assert resolve_window({"center": -600, "width": 1500}) == window_from_center_width(-600, 1500) == (-1350.0, 150.0)
    assert resolve_window([-160, 240]) == (-160.0, 240.0)
    for bad in ("lungs", (400, -1000), (0, 0), (float("nan"), 1), {"center": 0}, {"center": 0, "width": -1}, 5):
        with pytest.raises(ValueError):
            resolve_window(bad)
    values = hu_window(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0]))
    assert values.dtype == np.float32 and values.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_dicom_hu_slope_intercept_exact(tmp_path):
    stored = np.array([[0, 12, 362], [712, 1000, 5]], dtype=np.uint16)
    path = tmp_path / "slope2.dcm"
    _write_dicom(path, stored, slope=2.0, intercept=-1024.0)
    volume = read_dicom_slice(path)
    expected_hu = stored.astype(np.float64) * 2 - 1024  # [[-1024, -1000, -300], [400, 976, -1014]] HU
    assert volume.hu.shape == (3, 2, 1)  # MONAI layout: (columns, rows, slices)
    assert np.array_equal(volume.hu[..., 0], expected_hu.T)
    assert np.array_equal(hu_window(volume.hu[..., 0]).T, [[0.0, 0.0, 0.5], [1.0, 1.0, 0.0]])
    # MONAI's PydicomReader applies the rescale itself: same HU and affine, nothing applied twice
    loaded = LoadImage(reader="PydicomReader", image_only=True)(str(path))
    assert np.array_equal(loaded.numpy(), volume.hu[..., 0])
    _assert_same_slice_geometry(loaded.affine.numpy(), volume.affine)


def test_real_ct_small_dicom_hu():
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    volume = read_ct_slice(path)
    expected = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert np.array_equal(volume.hu[..., 0], expected.T)
    assert volume.hu.min() == -896.0 and volume.hu.max() == 1167.0
    loaded = LoadImage(reader="PydicomReader", image_only=True)(path)
    assert np.array_equal(loaded.numpy(), volume.hu[..., 0])
    _assert_same_slice_geometry(loaded.affine.numpy(), volume.affine)
    assert volume.affine[2, 2] == float(dataset.SliceThickness)  # MONAI puts 1 mm there for a single slice


def test_nifti_volume_slices_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, size=(7, 6, 5)).astype(np.float32)
    affine = np.array([[-0.7, 0.1, 0.0, 90.0], [0.0, 0.8, 0.2, -120.0], [0.05, 0.0, 2.5, -300.0], [0, 0, 0, 1]])
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), source)
    volume = read_ct_volume(source)
    assert volume.slice_axis == 2 and volume.num_slices == 5
    predictions = [torch.from_numpy(plane[None] > -300) for plane in volume_to_slices(volume)]
    out = slices_to_nifti(predictions, volume, tmp_path / "pred" / "mask.nii.gz")
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, affine, atol=1e-5)
    assert np.array_equal(np.asarray(written.dataobj), (hu > -300).astype(np.uint8))
    windowed = list(volume_to_slices(volume, window="lung", add_channel=True))
    assert windowed[0].shape == (1, 7, 6) and 0.0 <= windowed[0].min() and windowed[0].max() <= 1.0


def test_nifti_axial_axis_detection_roundtrip(tmp_path):
    hu = np.zeros((4, 3, 5), np.float32)
    hu[1, 2, 3] = 100
    affine = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 runs superior
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "sag.nii.gz")
    volume = read_nifti_volume(tmp_path / "sag.nii.gz")
    assert volume.slice_axis == 0 and volume.slice_shape == (3, 5)
    out = slices_to_nifti([plane > 0 for plane in volume_to_slices(volume)], volume, tmp_path / "m.nii.gz")
    assert np.array_equal(np.asarray(nib.load(out).dataobj), (hu > 0).astype(np.uint8))


def _lps_world(dataset, row, column):
    position = np.asarray(dataset.ImagePositionPatient, float)
    orientation = np.asarray(dataset.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    return position + column * column_spacing * orientation[:3] + row * row_spacing * orientation[3:]


def test_dicom_series_to_nifti_mask_world_positions(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    datasets = []
    for index, z in enumerate([30.0, 32.5, 35.0, 37.5]):
        stored = _stored_image(offset=index)
        # file names in reverse order of position; InstanceNumber follows position
        datasets.append(_write_dicom(series / f"im{9 - index}.dcm", stored, slope=2.0, position=(-100.0, -80.0, z),
                                     instance=index + 1))
    (series / "notes.txt").write_text("not DICOM")
    volume = read_dicom_series(series)
    assert volume.hu.shape == (5, 6, 4)
    assert [p.split("/")[-1] for p in volume.files] == ["im9.dcm", "im8.dcm", "im7.dcm", "im6.dcm"]
    loaded = LoadImage(reader="PydicomReader", image_only=True)(str(series))
    assert np.allclose(loaded.affine.numpy(), volume.affine) and np.array_equal(loaded.numpy(), volume.hu)

    threshold = 0.0
    out = slices_to_nifti([plane > threshold for plane in volume_to_slices(volume)], volume, tmp_path / "mask.nii")
    mask_image = nib.load(out)
    mask = np.asarray(mask_image.dataobj)
    predicted = {tuple(np.round(mask_image.affine @ [i, j, k, 1], 4)[:3]) for i, j, k in zip(*np.nonzero(mask))}
    expected = set()
    for dataset in datasets:  # thresholded voxels straight from the DICOM files, in RAS world coordinates
        hu = dataset.pixel_array * 2.0 - 1024
        for row, column in zip(*np.nonzero(hu > threshold)):
            x, y, z = _lps_world(dataset, row, column)
            expected.add(tuple(np.round([-x, -y, z], 4)))
    assert predicted == expected and len(expected) > 0


def test_oblique_series_affine_matches_monai(tmp_path):
    angle = np.deg2rad(20)
    row_dir = [round(np.cos(angle), 6), round(np.sin(angle), 6), 0.0]  # DS values are at most 16 characters
    column_dir = [0.0, 0.0, -1.0]  # coronal-ish oblique
    normal = np.cross(row_dir, column_dir)
    for index in range(3):
        position = np.array([10.0, 20.0, 30.0]) + 3.0 * index * normal
        _write_dicom(tmp_path / f"s{index}.dcm", _stored_image(offset=index), position=position,
                     orientation=row_dir + column_dir, instance=index + 1)
    volume = read_ct_volume(tmp_path)
    loaded = LoadImage(reader="PydicomReader", image_only=True)(str(tmp_path))
    assert np.allclose(loaded.affine.numpy(), volume.affine)
    assert np.array_equal(loaded.numpy(), volume.hu)


def test_dicom_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(b"\x01\x02garbage" * 20)
    with pytest.raises(CTReadError, match="corrupt.dcm"):
        read_dicom_slice(corrupt)
    no_pixels = tmp_path / "nopixels.dcm"
    _write_dicom(no_pixels, _stored_image(), pixel_data=False)
    with pytest.raises(CTReadError, match="nopixels.dcm: DICOM file has no pixel data"):
        read_ct_slice(no_pixels)
    truncated = tmp_path / "truncated.dcm"
    _write_dicom(truncated, _stored_image(40, 40))
    truncated.write_bytes(truncated.read_bytes()[:-1500])
    with pytest.raises(CTReadError, match="truncated.dcm"):
        read_ct_slice(truncated)
    single = tmp_path / "single.dcm"
    _write_dicom(single, _stored_image())
    with pytest.raises(CTReadError, match="single.dcm: a single 2-D slice where a 3-D volume is expected"):
        read_ct_volume(single)


def test_multiframe_and_volume_where_slice_expected(tmp_path):
    frames = tmp_path / "multiframe.dcm"
    ds = _write_dicom(frames, _stored_image())
    ds.NumberOfFrames = 3
    ds.PixelData = np.zeros((3, 6, 5), np.uint16).tobytes()
    write_dicom_file(ds, frames)
    with pytest.raises(CTReadError, match="multiframe.dcm: multi-frame DICOM"):
        read_ct_slice(frames)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(CTReadError, match="vol.nii.gz: a 3-D volume"):
        read_ct_slice(tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    assert read_ct_slice(tmp_path / "slice.nii.gz").hu.shape == (4, 4, 1)
    with pytest.raises(CTReadError, match="slice.nii.gz: a single 2-D slice"):
        read_ct_volume(tmp_path / "slice.nii.gz")


def test_mixed_series_errors(tmp_path):
    mixed_uid = tmp_path / "uids"
    mixed_uid.mkdir()
    _write_dicom(mixed_uid / "a.dcm", _stored_image(), position=(0, 0, 0), series_uid="1.2.3")
    _write_dicom(mixed_uid / "b.dcm", _stored_image(), position=(0, 0, 2), series_uid="1.2.4")
    with pytest.raises(CTReadError, match="uids: mixed DICOM series, 2 SeriesInstanceUIDs"):
        read_dicom_series(mixed_uid)
    mixed_size = tmp_path / "sizes"
    mixed_size.mkdir()
    _write_dicom(mixed_size / "a.dcm", _stored_image(), position=(0, 0, 0))
    _write_dicom(mixed_size / "b.dcm", _stored_image(7, 5), position=(0, 0, 2))
    with pytest.raises(CTReadError, match="b.dcm differs from a.dcm in image size"):
        read_dicom_series(mixed_size)
    duplicate = tmp_path / "dup"
    duplicate.mkdir()
    _write_dicom(duplicate / "a.dcm", _stored_image(), position=(0, 0, 0))
    _write_dicom(duplicate / "b.dcm", _stored_image(), position=(0, 0, 0), instance=2)
    with pytest.raises(CTReadError, match="same slice position"):
        read_dicom_series(duplicate)


def test_slices_to_nifti_checks_predictions(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 2), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    volume = read_ct_volume(tmp_path / "v.nii.gz")
    with pytest.raises(CTReadError, match="got 1 prediction slices for 2 slices"):
        slices_to_nifti([np.zeros((4, 3))], volume, tmp_path / "o.nii.gz")
    with pytest.raises(CTReadError, match=r"prediction slice 1 has shape \(3, 4\)"):
        slices_to_nifti([np.zeros((4, 3)), np.zeros((3, 4))], volume, tmp_path / "o.nii.gz")


def test_radiological_view():
    display = np.arange(6).reshape(2, 3)
    assert np.array_equal(radiological_view(display.T), display)  # no geometry: MONAI layout is the transpose
    assert np.array_equal(radiological_view(display.T, np.diag([-1.0, -1.0, 1.0, 1.0])), display)
    assert np.array_equal(radiological_view(display.T[::-1, ::-1], np.diag([2.0, 2.0, 1.0, 1.0])), display)


def test_ct_window_transforms():
    data = {"image": MetaTensor(torch.tensor([[[-1000.0, -300.0], [400.0, 1000.0]]]), meta={"filename_or_obj": "x"})}
    out = CTWindowd(keys="image", window="lung")(data)["image"]
    assert isinstance(out, MetaTensor) and out.tolist() == [[[0.0, 0.5], [1.0, 1.0]]]
    assert CTWindow({"center": 40, "width": 400}).window == (-160.0, 240.0)
    with pytest.raises(ValueError):
        CTWindowd(keys="image", window=(400, -1000))


def test_ensure_single_slice():
    flat = MetaTensor(torch.zeros(1, 4, 5, 1), meta={"filename_or_obj": "/data/one.nii.gz"})
    assert EnsureSingleSliced(keys="image")({"image": flat})["image"].shape == (1, 4, 5)
    volume = MetaTensor(torch.zeros(1, 4, 5, 3), meta={"filename_or_obj": "/data/vol.nii.gz"})
    with pytest.raises(ValueError, match="/data/vol.nii.gz: expected a single 2-D slice"):
        EnsureSingleSliced(keys="image")({"image": volume})
