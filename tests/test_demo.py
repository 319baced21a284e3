"""Tests for himix_monai.demo.slices and the data_prep.demo command line tool."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged, ScaleIntensityRanged
from skimage.measure import label

from data_prep.demo import main as demo_main
from himix_monai.data.ct import DicomSeriesReader
from himix_monai.demo.slices import (
    DemoDatasetMismatchError,
    ensure_demo_dataset,
    generate_demo_dataset,
    split_counts,
    synthesize_chest_slice,
)
from himix_monai.mask_reports import chest_report, read_mask

SIZE = 96


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A 7-case dataset, its regeneration with the same seed, and a decoy version."""
    root = tmp_path_factory.mktemp("demo")
    first = generate_demo_dataset(root / "a", num=7, seed=5, size=SIZE, decoys=False)
    second = generate_demo_dataset(root / "b", num=7, seed=5, size=SIZE, decoys=False)
    decoys = generate_demo_dataset(root / "d", num=7, seed=5, size=SIZE, decoys=True)
    return first, second, decoys


def _items(datalist_path):
    datalist = json.loads(Path(datalist_path).read_text())
    return [item for split in ("training", "validation", "test") for item in datalist[split]]


def test_same_seed_same_data(demo):
    first, second, _ = demo
    for a, b in zip(_items(first), _items(second)):
        assert a["text"] == b["text"]
        for key in ("image", "label", "image_dicom", "lung_mask"):
            assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes(), key


def test_different_seeds_differ():
    a = synthesize_chest_slice(seed=1, index=0, size=SIZE)
    b = synthesize_chest_slice(seed=2, index=0, size=SIZE)
    assert not np.array_equal(a.lesion_mask, b.lesion_mask) and not np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.hu, synthesize_chest_slice(seed=1, index=0, size=SIZE).hu)


def test_datalist_loads_with_monai(demo):
    first, _, _ = demo
    counts = [len(load_decathlon_datalist(first, data_list_key=split)) for split in ("training", "validation", "test")]
    assert counts == list(split_counts(7)) == [5, 1, 1]
    item = load_decathlon_datalist(first, data_list_key="training")[0]
    assert set(item) >= {"image", "label", "text", "image_dicom"} and Path(item["image"]).is_absolute()


def test_text_matches_mask(demo):
    first, _, _ = demo
    for item in _items(first):
        mask, lungs = read_mask(item["label"]), read_mask(item["lung_mask"])
        assert item["text"] == chest_report(mask, lung_mask=lungs)
        assert item["text"].endswith(" lung.") and "infected area" in item["text"]


def test_monai_loading_is_aligned_and_windowed(demo):
    first, _, _ = demo
    item = _items(first)[0]
    load = Compose([LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"])])
    loaded = load(dict(item))
    image, mask = loaded["image"], loaded["label"]
    assert image.shape == mask.shape == (1, SIZE, SIZE)
    assert np.allclose(image.affine, mask.affine)
    lesion_hu = float(image[mask > 0].mean())
    assert -550 < lesion_hu < -250  # the label covers the ground-glass lesions
    assert float(image.min()) >= -1024 and float(image.max()) > 300  # air and bone in HU
    windowed = ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True)(loaded)["image"]
    assert windowed.shape == (1, SIZE, SIZE) and 0.0 <= float(windowed.min()) and float(windowed.max()) <= 1.0
    dicom = LoadImage(image_only=True, reader="PydicomReader")(item["image_dicom"])
    assert np.array_equal(dicom.numpy(), image[0].numpy()) and np.allclose(dicom.affine, image.affine)


def test_dicom_tags_and_hu(demo):
    first, _, _ = demo
    item = _items(first)[0]
    dataset = pydicom.dcmread(item["image_dicom"])
    assert dataset.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage == dataset.SOPClassUID
    assert dataset.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (float(dataset.RescaleSlope), float(dataset.RescaleIntercept)) == (1.0, -1024.0)
    assert dataset.pixel_array.dtype == np.uint16 and dataset.Modality == "CT"
    assert [float(v) for v in dataset.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    nifti_hu = np.asarray(nib.load(item["image"]).dataobj)
    assert np.array_equal(LoadImage(reader=DicomSeriesReader(), image_only=True)(item["image_dicom"]).numpy(), nifti_hu)
    assert np.array_equal(dataset.pixel_array.astype(int) - 1024, nifti_hu.T)


def _unmasked_lesion_blobs(item):
    """Lesion-like (ground-glass HU) blobs in the lungs that the label does not cover."""
    hu = np.asarray(nib.load(item["image"]).dataobj).T
    lungs, mask = read_mask(item["lung_mask"]), read_mask(item["label"])
    candidates = lungs & (hu > -650) & ~mask
    components = label(candidates, connectivity=2)
    return int(sum(np.bincount(components.ravel())[1:] >= 12))


def test_decoys_in_image_not_in_mask(demo):
    first, _, decoys = demo
    plain_items, decoy_items = _items(first), _items(decoys)
    assert sum(_unmasked_lesion_blobs(item) for item in plain_items) == 0
    assert all(_unmasked_lesion_blobs(item) >= 1 for item in decoy_items)
    for plain, decoy in zip(plain_items, decoy_items):  # decoys change neither the mask nor the text
        assert plain["text"] == decoy["text"]
        assert Path(plain["label"]).read_bytes() == Path(decoy["label"]).read_bytes()


def test_ensure_demo_dataset_once_and_concurrently(tmp_path):
    target = tmp_path / "shared"
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ensure_demo_dataset(target, num=3, seed=0, size=64), range(3)))
    assert len(set(paths)) == 1 and paths[0] == target / "datalist.json"
    stamp = paths[0].stat().st_mtime_ns
    assert ensure_demo_dataset(target, num=3, seed=0, size=64) == paths[0] and paths[0].stat().st_mtime_ns == stamp
    assert len(list((target / "images").iterdir())) == 3


@pytest.mark.parametrize(
    "settings, named",
    [({"num": 4}, "num=3"), ({"decoys": False}, "decoys=True"), ({"seed": 1}, "seed=0"), ({"size": 96}, "size=64")],
)
def test_ensure_demo_dataset_refuses_a_folder_made_with_other_settings(tmp_path, settings, named):
    target = tmp_path / "demo"
    datalist = ensure_demo_dataset(target, num=3, seed=0, size=64, decoys=True)
    assert json.loads(datalist.read_text())["generator"] == {"num": 3, "seed": 0, "size": 64, "decoys": True}
    before = {path: path.stat().st_mtime_ns for path in target.rglob("*")}
    with pytest.raises(DemoDatasetMismatchError, match=named) as error:
        ensure_demo_dataset(target, **{"num": 3, "seed": 0, "size": 64, "decoys": True, **settings})
    assert str(target) in str(error.value) and "--dataset_dir" in str(error.value)
    assert {path: path.stat().st_mtime_ns for path in target.rglob("*")} == before  # nothing touched


def test_ensure_demo_dataset_refuses_a_datalist_not_made_by_the_generator(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [{"image": "mine.png", "text": "x"}]}))
    with pytest.raises(DemoDatasetMismatchError, match="records no demo generator settings"):
        ensure_demo_dataset(tmp_path, num=3, size=64)
    assert json.loads((tmp_path / "datalist.json").read_text())["training"][0]["image"] == "mine.png"


def test_cli(tmp_path, capsys):
    assert demo_main(["--out", str(tmp_path / "cli"), "--num", "3", "--seed", "1", "--size", "64"]) == 0
    assert "3 cases with decoys (training 1, validation 1, test 1)" in capsys.readouterr().out  # decoys by default
    assert demo_main(["--out", str(tmp_path / "plain"), "--num", "3", "--size", "64", "--no-decoys"]) == 0
    assert "3 cases (training 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "plain" / "datalist.json").read_text())["generator"]["decoys"] is False
    assert demo_main(["--out", str(tmp_path / "bad"), "--num", "0"]) == 1
