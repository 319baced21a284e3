"""2.5D context slices (issue 17): neighbour stacking at the volume edges, the k > 0 vs 2-D input error, the volume
demo (lesions span slices, decoys are tubes, DICOM series readable), the volume datalist and slice inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import LoadImage

from himix_monai.data.datalist import DatalistError
from himix_monai.demo.volumes import generate_volume_demo_dataset, synthesize_chest_volume
from himix_monai.data.volume_datalist import load_volume_datalist
from himix_monai.errors import SettingError
from himix_monai.inferers import TextSliceInferer
from himix_monai.transforms.context import (
    ContextSlicesError,
    EnsureContextVolumed,
    StackNeighbourSlices,
    StackNeighbourSlicesd,
    check_context_route,
    network_in_channels,
)


@pytest.mark.parametrize("k", [1, 2])
def test_stacking_repeats_the_edge_slice_at_both_ends(k):
    depth, channels = 5, 2
    # voxel value = 10 * channel + slice index, so every output value names its source slice and channel
    volume = torch.arange(depth, dtype=torch.float32).expand(channels, 3, 4, depth)
    volume = volume + 10 * torch.arange(channels)[:, None, None, None]
    affine = torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0]))
    volume = MetaTensor(volume, affine=affine, meta={"filename_or_obj": "v.nii.gz"})
    out = StackNeighbourSlices(k)(volume)
    assert out.shape == (channels * (2 * k + 1), 3, 4, depth)
    for i in range(depth):
        for j in range(2 * k + 1):
            source = min(max(i + j - k, 0), depth - 1)  # clamped: the first/last slice repeated
            for c in range(channels):
                assert out[j * channels + c, 0, 0, i] == 10 * c + source, (i, j, c)
    assert out[k * channels, 0, 0, 0] == 0 and out[0, 0, 0, 0] == 0  # slice 0: its missing neighbours are slice 0
    assert out[(2 * k) * channels, 0, 0, depth - 1] == depth - 1  # last slice: its missing neighbours are itself
    assert torch.equal(out.affine, volume.affine) and out.meta["filename_or_obj"] == "v.nii.gz"
    d = StackNeighbourSlicesd("image", context_slices=k)({"image": volume, "label": volume[:1]})
    assert d["image"].shape[0] == channels * (2 * k + 1) and d["label"].shape[0] == 1
    assert StackNeighbourSlices(0)(volume) is volume  # k = 0: today's behaviour


def test_network_in_channels_and_the_training_route_check():
    assert [network_in_channels(1, k) for k in (0, 1, 2, "1")] == [1, 3, 5, 3]
    assert check_context_route(0, False) == 0 and check_context_route("2", "true") == 2
    with pytest.raises(SettingError, match=r"context_slices=1 needs volumes.*--volume_data true"):
        check_context_route(1, "false")
    with pytest.raises(SettingError, match="whole number >= 0"):
        network_in_channels(1, -1)


def test_a_context_model_refuses_a_2d_picture_and_a_single_slice(tmp_path):
    from PIL import Image
    import nibabel as nib

    picture = tmp_path / "chest.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(picture)
    single = tmp_path / "one_slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.int16), np.eye(4)), str(single))
    check = EnsureContextVolumed("image", context_slices=1)
    for path in (picture, single):
        image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
        with pytest.raises(ContextSlicesError, match=rf"{path.name}: this model needs volumes \(context_slices=1\)"):
            check({"image": image})
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(picture))
    assert EnsureContextVolumed("image", context_slices=0)({"image": image})["image"] is image  # k = 0 passes


def _areas(mask: np.ndarray) -> np.ndarray:
    return mask.reshape(mask.shape[0], -1).sum(axis=1)


def test_volume_demo_lesions_span_slices_and_decoys_are_tubes():
    from scipy.ndimage import center_of_mass, label

    for index in range(3):
        case = synthesize_chest_volume(0, index, size=64, depth=16)
        assert case.hu.shape == case.lesion_mask.shape == (16, 64, 64)
        lesions, count = label(case.lesion_mask)
        assert count == len(case.lesion_cells) >= 1
        for n in range(1, count + 1):  # ellipsoids: several slices, the cross-section grows then shrinks
            areas = _areas(lesions == n)
            present = np.flatnonzero(areas)
            assert len(present) >= 3
            assert areas[present[0]] < areas.max() and areas[present[-1]] < areas.max()
        decoys, count = label(case.decoy_mask)
        assert count == len(case.decoy_cells) >= 2
        assert not (case.decoy_mask & case.lesion_mask).any()
        for n in range(1, count + 1):  # tubes: on every slice, about the same size, centre moving
            areas = _areas(decoys == n)
            assert (areas > 0).all() and areas.min() >= 0.6 * areas.max()
            centres = np.array([center_of_mass(decoys[z] == n) for z in range(16)])
            assert np.linalg.norm(centres[-1] - centres[0]) > 3.0
        # one decoy sits in a reported lesion's zone: the report alone cannot rule it out
        assert case.decoy_cells[0] in case.lesion_cells
        for side, zone in case.lesion_cells:  # the report names every lesion's zone
            assert zone in case.report and f"{side} lung" in case.report


def test_volume_demo_files_dicom_series_and_datalist(tmp_path):
    path = generate_volume_demo_dataset(tmp_path / "vd", num=3, size=64, depth=8, dicom_series=2)
    datalist = json.loads(path.read_text())
    items = datalist["training"] + datalist["validation"] + datalist["test"]
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    assert datalist["generator"]["kind"] == "volumes" and all(item["text"].endswith("lung.") for item in items)
    assert ["image_dicom" in item for item in items] == [True, True, False]
    nifti = LoadImage(image_only=True)(items[0]["image"])
    series = LoadImage(image_only=True, reader=PydicomReader())(items[0]["image_dicom"])
    label = LoadImage(image_only=True)(items[0]["label"])
    assert nifti.shape == series.shape == label.shape == (64, 64, 8)
    assert torch.equal(torch.as_tensor(nifti), torch.as_tensor(series))  # same HU, same layout
    assert torch.allclose(nifti.affine, series.affine, atol=1e-4) and torch.allclose(label.affine, nifti.affine)
    case = synthesize_chest_volume(0, 0, size=64, depth=8)
    assert np.array_equal(np.asarray(label), np.transpose(case.lesion_mask, (2, 1, 0)))
    assert case.report == items[0]["text"]


def test_volume_datalist_checks_and_dicom_route(tmp_path):
    path = generate_volume_demo_dataset(tmp_path / "vd", num=3, size=64, depth=8)
    items = load_volume_datalist(path, "training", image_key="image_dicom")
    assert items[0]["image"].endswith("vol_0000") and set(items[0]) == {"image", "label", "text"}
    raw = json.loads(path.read_text())
    raw["training"][0]["slice_texts"] = ["a"] * 8
    bad = tmp_path / "slice_texts.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(DatalistError, match="per-slice reports are not supported"):
        load_volume_datalist(bad, "training")
    raw = json.loads(path.read_text())
    raw["training"][0]["label"] = raw["validation"][0]["image"].replace("images", "labels")  # fine: same shape
    raw["training"][0]["image"] = str(tmp_path / "picture.png")
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "picture.png")
    bad.write_text(json.dumps(raw))
    with pytest.raises(DatalistError, match=r"picture.png is not a NIfTI volume .*context_slices=0"):
        load_volume_datalist(bad, "training")


def test_stacked_volume_through_text_slice_inferer_keeps_slices_in_place():
    """A k=1 stand-in network returns its middle channel block: the stitched output must be the input volume, slice
    for slice, so stacking + SliceInferer put every slice's prediction back at its own position."""
    seen = []

    def network(x, input_ids, attention_mask):
        assert x.shape[1] == 3 and input_ids.shape[0] == x.shape[0] == attention_mask.shape[0]
        seen.append(int(input_ids[0, 0]))
        return x[:, 1:2] * 2.0

    volume = MetaTensor(torch.rand(1, 16, 12, 7), affine=torch.diag(torch.tensor([0.7, 0.7, 5.0, 1.0])))
    stacked = StackNeighbourSlicesd("image", context_slices=1)({"image": volume})["image"]
    inferer = TextSliceInferer(roi_size=(16, 12), sw_batch_size=3)
    for flip, token in ((False, 5), (True, 9)):  # two volumes, one at a time, each with its own tokens
        ids = torch.tensor([[token, 1]])
        source = stacked.flip(-1) if flip else stacked
        out = inferer(source[None], network, ids, torch.ones_like(ids))
        assert out.shape == (1, 1, 16, 12, 7)
        assert torch.allclose(out[0], 2 * (volume.as_tensor().flip(-1) if flip else volume.as_tensor()))
    assert set(seen) == {5, 9}  # each volume's slices saw that volume's report


def test_context_transforms_with_monai_slice_inferer_and_invertd_keep_the_source_geometry(tmp_path):
    """The inference route s2-vol builds (LoadImaged -> ... -> Resized -> SliceInferer -> Invertd) with this module's
    check and stacking inserted: a k=1 tiny 2-D network, a 40x36x6 NIfTI volume; the mask comes back at the source
    size with the source affine."""
    import nibabel as nib
    from monai.inferers import SliceInferer
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Resized, ScaleIntensityRanged

    affine = np.array([[-0.8, 0, 0, 10.0], [0, -0.8, 0, 12.0], [0, 0, 5.0, -100.0], [0, 0, 0, 1]])
    path = tmp_path / "ct.nii.gz"
    hu = np.random.default_rng(0).integers(-1000, 400, (40, 36, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    preprocessing = Compose([
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image"),
        EnsureContextVolumed("image", context_slices=1),
        ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True),
        StackNeighbourSlicesd("image", context_slices=1),
        Resized("image", spatial_size=(32, 32, -1), mode="bilinear"),
    ])  # fmt: skip
    data = preprocessing({"image": str(path)})
    assert data["image"].shape == (3, 32, 32, 6)
    torch.manual_seed(0)
    network = torch.nn.Conv2d(3, 1, kernel_size=3, padding=1)  # first conv of a k=1 model: 3 input channels
    with torch.no_grad():
        data["pred"] = SliceInferer(roi_size=(32, 32), spatial_dim=2, sw_batch_size=4)(data["image"][None], network)[0]
    assert data["pred"].shape == (1, 32, 32, 6)
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert inverted.shape == (1, 40, 36, 6)
    assert np.allclose(np.asarray(inverted.affine), affine, atol=1e-5)


def test_volume_demo_command_line(tmp_path, capsys):
    from data_prep.volume_demo import main

    assert main(["--out", str(tmp_path / "v"), "--num", "1", "--depth", "8", "--dicom-series", "0"]) == 0
    assert "1 volumes of 64x64x8" in capsys.readouterr().out
    assert (tmp_path / "v" / "images" / "vol_0000.nii.gz").is_file() and not (tmp_path / "v" / "dicom").exists()
