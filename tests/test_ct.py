"""Tests for himix_monai.data.ct (DicomSeriesReader, CT geometry), SliceAxisLastd and TextSliceInferer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImage, LoadImaged
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from himix_monai.data.ct import CTReadError, DicomSeriesReader, axial_axis, dicom_slice_affine, radiological_view
from himix_monai.demo.slices import write_dicom_file
from himix_monai.inferers import AutocastInferer, TextSliceInferer
from himix_monai.transforms import SliceAxisLastd

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


def load(path, **kwargs):
    return LoadImage(reader=DicomSeriesReader(**kwargs), image_only=True)(str(path))


def test_dicom_hu_slope_intercept_exact(tmp_path):
    stored = np.array([[0, 12, 362], [712, 1000, 5]], dtype=np.uint16)
    path = tmp_path / "slope2.dcm"
    dataset = _write_dicom(path, stored, slope=2.0, intercept=-1024.0)
    loaded = load(path)
    expected_hu = stored.astype(np.float64) * 2 - 1024  # [[-1024, -1000, -300], [400, 976, -1014]] HU
    assert loaded.shape == (3, 2)  # MONAI layout: (columns, rows)
    assert np.array_equal(loaded.numpy(), expected_hu.T)  # rescaled once
    monai = LoadImage(reader="PydicomReader", image_only=True)(str(path))  # single files: as MONAI's reader
    assert np.array_equal(monai.numpy(), loaded.numpy()) and np.allclose(monai.affine, loaded.affine)
    assert np.allclose(dicom_slice_affine(dataset)[:, [0, 1, 3]], loaded.affine.numpy()[:, [0, 1, 3]])


def test_real_ct_small_dicom_hu():
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    loaded = load(path)
    expected = dataset.pixel_array.astype(np.float64) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert np.array_equal(loaded.numpy(), expected.T)
    assert loaded.min() == -896.0 and loaded.max() == 1167.0
    assert dicom_slice_affine(dataset)[2, 2] == float(dataset.SliceThickness)  # MONAI puts 1 mm there


def _lps_world(dataset, row, column):
    position = np.asarray(dataset.ImagePositionPatient, float)
    orientation = np.asarray(dataset.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    return position + column * column_spacing * orientation[:3] + row * row_spacing * orientation[3:]


def test_series_sorted_by_position_with_world_geometry(tmp_path):
    """Slices are stacked by position along the normal, not by InstanceNumber or file name (MONAI sorts by
    InstanceNumber): every voxel lands at the world position its DICOM file gives."""
    series = tmp_path / "series"
    series.mkdir()
    datasets = []
    for index, z in enumerate([30.0, 32.5, 35.0, 37.5]):
        instance = [3, 1, 4, 2][index]  # InstanceNumber does not follow position
        datasets.append(_write_dicom(series / f"im{9 - index}.dcm", _stored_image(offset=index), slope=2.0,
                                     position=(-100.0, -80.0, z), instance=instance))
    (series / "notes.txt").write_text("not DICOM")
    volume = load(series)
    assert volume.shape == (5, 6, 4)
    assert volume.meta["filename_or_obj"] == str(series)
    affine = volume.affine.numpy()
    for dataset in datasets:  # every voxel at the RAS world position of its DICOM pixel
        hu = dataset.pixel_array * 2.0 - 1024
        for row, column in [(0, 0), (5, 4), (2, 3)]:
            x, y, z = _lps_world(dataset, row, column)
            k = int(np.argmin([abs(float(d.ImagePositionPatient[2]) - z) for d in datasets]))
            assert np.allclose(affine @ [column, row, k, 1], [-x, -y, z, 1])
            assert volume[column, row, k] == hu[row, column]


def test_oblique_series_affine_matches_monai(tmp_path):
    angle = np.deg2rad(20)
    row_dir = [round(np.cos(angle), 6), round(np.sin(angle), 6), 0.0]  # DS values are at most 16 characters
    column_dir = [0.0, 0.0, -1.0]  # coronal-ish oblique
    normal = np.cross(row_dir, column_dir)
    for index in range(3):
        position = np.array([10.0, 20.0, 30.0]) + 3.0 * index * normal
        _write_dicom(tmp_path / f"s{index}.dcm", _stored_image(offset=index), position=position,
                     orientation=row_dir + column_dir, instance=index + 1)
    volume = load(tmp_path)
    monai = LoadImage(reader="PydicomReader", image_only=True)(str(tmp_path))  # InstanceNumber = position order
    assert np.allclose(monai.affine, volume.affine) and np.array_equal(monai.numpy(), volume.numpy())


def test_dicom_errors_name_the_file(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for k in range(2):
        _write_dicom(series / f"ok{k}.dcm", _stored_image(), position=(0, 0, 2.0 * k), instance=k + 1)
    (series / "corrupt.dcm").write_bytes(b"\x01\x02garbage" * 20)
    with pytest.raises(CTReadError, match="corrupt.dcm: not a valid DICOM file or corrupt"):
        load(series)
    (series / "corrupt.dcm").unlink()
    _write_dicom(series / "nopixels.dcm", _stored_image(), position=(0, 0, 4), pixel_data=False)
    with pytest.raises(CTReadError, match="nopixels.dcm: DICOM file has no pixel data"):
        load(series)
    (series / "nopixels.dcm").unlink()
    _write_dicom(series / "truncated.dcm", _stored_image(), position=(0, 0, 4))
    (series / "truncated.dcm").write_bytes((series / "truncated.dcm").read_bytes()[:-20])
    with pytest.raises(CTReadError, match="truncated.dcm: cannot decode the DICOM pixel data"):
        load(series)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTReadError, match="empty: no DICOM files in the folder"):
        load(tmp_path / "empty")
    single = tmp_path / "one"
    single.mkdir()
    _write_dicom(single / "a.dcm", _stored_image())
    assert load(single).shape == (5, 6, 1)  # a folder is a volume, of one slice here


def test_mixed_series_are_refused_by_name(tmp_path):
    mixed_uid = tmp_path / "uids"
    mixed_uid.mkdir()
    _write_dicom(mixed_uid / "a.dcm", _stored_image(), position=(0, 0, 0), series_uid="1.2.3")
    _write_dicom(mixed_uid / "b.dcm", _stored_image(), position=(0, 0, 2), series_uid="1.2.4")
    with pytest.raises(CTReadError, match="uids: mixed DICOM series, 2 SeriesInstanceUIDs: .*put each series in its own"):
        load(mixed_uid)
    mixed_size = tmp_path / "sizes"
    mixed_size.mkdir()
    _write_dicom(mixed_size / "a.dcm", _stored_image(), position=(0, 0, 0))
    _write_dicom(mixed_size / "b.dcm", _stored_image(7, 5), position=(0, 0, 2))
    with pytest.raises(CTReadError, match="b.dcm differs from a.dcm in image size"):
        load(mixed_size)
    duplicate = tmp_path / "dup"
    duplicate.mkdir()
    _write_dicom(duplicate / "a.dcm", _stored_image(), position=(0, 0, 0))
    _write_dicom(duplicate / "b.dcm", _stored_image(), position=(0, 0, 0), instance=2)
    with pytest.raises(CTReadError, match="dup: mixed DICOM series, a.dcm and b.dcm have the same slice position"):
        load(duplicate)


def test_a_missing_slice_is_refused_by_name(tmp_path):
    series = tmp_path / "gap"
    series.mkdir()
    for k, z in enumerate((0.0, 2.5, 5.0, 7.5, 12.5, 15.0)):  # 10.0 is missing
        _write_dicom(series / f"IM{k}.dcm", _stored_image(offset=k), position=(0, 0, z), instance=k + 1)
    with pytest.raises(CTReadError, match=r"gap: missing slice .*IM3.dcm and IM4.dcm .*5 mm apart where the median step is "
                       r"2.5 mm .*put the series' missing files in the folder"):
        load(series)
    with pytest.warns(UserWarning, match="uneven slice spacing"):  # uneven, no slice missing: read, with a warning
        (series / "IM4.dcm").unlink()
        _write_dicom(series / "IM4.dcm", _stored_image(), position=(0, 0, 9.0), instance=5)
        (series / "IM5.dcm").unlink()
        assert load(series).shape == (5, 6, 5)


def test_radiological_view():
    display = np.arange(6).reshape(2, 3)
    assert np.array_equal(radiological_view(display.T), display)  # no geometry: MONAI layout is the transpose
    assert np.array_equal(radiological_view(display.T, np.diag([-1.0, -1.0, 1.0, 1.0])), display)
    assert np.array_equal(radiological_view(display.T[::-1, ::-1], np.diag([2.0, 2.0, 1.0, 1.0])), display)


def test_slice_axis_last_keeps_the_in_plane_layout_and_inverts(tmp_path):
    """A volume whose axis 0 runs superior-inferior: its slices are taken along axis 0 (as a 2-D slice of it is
    laid out), and Invertd puts a prediction back onto the source voxels."""
    data = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    affine = np.array([[0, 0, -1.0, 10], [0, 0.8, 0, 0], [2.5, 0, 0, -30], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "sag.nii.gz")
    assert axial_axis(affine) == 0 and axial_axis(np.eye(4)) == 2
    transform = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), SliceAxisLastd("image")])
    out = transform({"image": str(tmp_path / "sag.nii.gz")})
    assert out["image"].shape == (1, 4, 3, 5)
    for k in range(5):  # slice k is data[k] unflipped
        np.testing.assert_array_equal(out["image"][0, ..., k].numpy(), data[k])
    out["pred"] = out["image"] > 0
    inverted = Invertd("pred", transform=transform, orig_keys="image", nearest_interp=True)(out)["pred"]
    assert inverted.shape == (1, 5, 4, 3) and np.allclose(inverted.affine, affine)
    np.testing.assert_array_equal(inverted[0].numpy(), data > 0)


class _Recorder(torch.nn.Module):
    """Logits from the image plus the first token id; records the batch sizes it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, image, input_ids, attention_mask):
        self.calls.append((image.shape[0], input_ids.shape[0], attention_mask.shape[0]))
        return image[:, :1] + input_ids[:, :1, None, None].to(image.dtype)


def test_text_slice_inferer_gives_every_slice_the_text():
    volume = torch.rand(1, 1, 8, 6, 5)
    input_ids, attention_mask = torch.tensor([[7, 1, 2]]), torch.ones(1, 3, dtype=torch.long)
    network = _Recorder()
    out = TextSliceInferer(roi_size=(8, 6), sw_batch_size=2, inferer=AutocastInferer())(
        volume, network, input_ids, attention_mask
    )
    assert out.shape == (1, 1, 8, 6, 5) and torch.allclose(out, volume + 7)
    assert [call[0] for call in network.calls] == [2, 2, 1] and all(len(set(call)) == 1 for call in network.calls)
    with pytest.raises(ValueError, match="one volume per batch"):
        TextSliceInferer(roi_size=(8, 6))(torch.rand(2, 1, 8, 6, 5), network, input_ids.repeat(2, 1), attention_mask)


def test_files_without_the_dicom_preamble_are_read(tmp_path):
    """Older DICOM files lack the 128-byte preamble and 'DICM' prefix; pydicom refuses them unless forced."""
    series = tmp_path / "old"
    series.mkdir()
    for k in range(2):
        dataset = _write_dicom(series / f"s{k}.dcm", _stored_image(offset=k), position=(0, 0, 2.0 * k), instance=k + 1)
        dataset.preamble = None
        del dataset.file_meta
        dataset.is_little_endian, dataset.is_implicit_VR = True, True
        dataset.save_as(series / f"s{k}.dcm", write_like_original=True)
    assert not pydicom.misc.is_dicom(str(series / "s0.dcm"))
    assert load(series).shape == (5, 6, 2)
    assert np.array_equal(load(series / "s1.dcm").numpy(), _stored_image(offset=1).T.astype(np.float32) - 1024)
