"""Tests of himix_monai.transforms.mask: mask binarisation and image channel handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from himix_monai.transforms.mask import (
    BinarizeMask,
    BinarizeMaskd,
    EnsureImageChannels,
    EnsureImageChannelsd,
)


def _load(keys):
    return Compose(
        [LoadImaged(keys, image_only=True, reader="PILReader", reverse_indexing=False), EnsureChannelFirstd(keys)]
    )


def test_grey_levels_0_255_threshold_at_127():
    mask = np.array([[[0, 3, 126, 127, 128, 200, 255]]], dtype=np.uint8)
    out = BinarizeMaskd("label")({"label": mask})["label"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.tolist() == [[[0, 0, 0, 0, 1, 1, 1]]]


def test_zero_one_masks_threshold_at_half():
    mask = torch.tensor([[[0.0, 0.2, 0.5, 0.51, 1.0]]])
    out = BinarizeMask()(mask)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.tolist() == [[[0, 0, 0, 1, 1]]]


def test_label_values_other_than_one_are_foreground():
    out = BinarizeMask()(np.array([[[0, 1, 2, 5]]]))
    assert out.tolist() == [[[0, 1, 1, 1]]]


def test_fixed_threshold():
    out = BinarizeMask(threshold=10)(np.array([[[0, 10, 11, 255]]]))
    assert out.tolist() == [[[0, 0, 1, 1]]]
    assert BinarizeMask().resolve_threshold(torch.tensor([0.0, 255.0])) == 127
    assert BinarizeMask().resolve_threshold(torch.tensor([0.0, 1.0])) == 0.5
    with pytest.raises(ValueError, match="threshold"):
        BinarizeMask(threshold="otsu")


def test_three_channel_mask_reduced_by_max():
    mask = np.zeros((3, 2, 2), dtype=np.uint8)
    mask[1, 0, 0] = 255  # foreground in one colour channel only
    mask[:, 1, 1] = 255  # MosMedData+: all three channels
    out = BinarizeMask()(mask)
    assert out.shape == (1, 2, 2)
    assert out.tolist() == [[[1, 0], [0, 1]]]


def test_rgba_mask_alpha_is_ignored():
    mask = np.zeros((4, 2, 2), dtype=np.uint8)
    mask[3] = 255  # opaque alpha everywhere
    mask[0, 1, 0] = 255
    assert BinarizeMask()(mask).tolist() == [[[0, 0], [1, 0]]]


def test_metatensor_meta_is_kept():
    mask = MetaTensor(torch.full((3, 2, 2), 255, dtype=torch.uint8), meta={"filename_or_obj": "m.png"})
    out = BinarizeMaskd("label")({"label": mask})["label"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "m.png"
    assert out.shape == (1, 2, 2) and out.dtype == torch.float32 and bool((out == 1).all())


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_mask_file(tmp_path, mode):
    truth = np.zeros((32, 32), dtype=bool)
    truth[8:24, 10:20] = True
    grey = np.where(truth, 255, 0).astype(np.uint8)
    array = grey if mode == "L" else np.stack([grey] * 3, axis=-1)
    path = tmp_path / f"mask_{mode}.jpg"
    Image.fromarray(array).save(path, quality=60)
    raw = np.asarray(Image.open(path))
    assert len(np.unique(raw)) > 2  # compression noise, not only 0 and 255
    out = Compose([_load("label"), BinarizeMaskd("label")])({"label": str(path)})["label"]
    assert out.shape == (1, 32, 32)
    assert set(np.unique(out.numpy()).tolist()) <= {0.0, 1.0}
    assert np.array_equal(out[0].numpy().astype(bool), truth)


def test_volume_error_names_the_file():
    volume = MetaTensor(torch.zeros(1, 8, 8, 5), meta={"filename_or_obj": "/data/ct_volume.nii.gz"})
    with pytest.raises(ValueError, match="ct_volume.nii.gz.*3-D volume"):
        BinarizeMaskd("label")({"label": volume})
    with pytest.raises(ValueError, match="ct_volume.nii.gz.*3-D volume"):
        EnsureImageChannelsd("image")({"image": volume})


def test_volume_error_falls_back_to_the_datalist_image():
    with pytest.raises(ValueError, match="scans/a.png"):
        BinarizeMaskd("label")({"image": "scans/a.png", "label": np.zeros((1, 8, 8, 5))})


def test_missing_channel_dim_or_channel_last_is_an_error():
    with pytest.raises(ValueError, match="EnsureChannelFirstd"):
        BinarizeMask()(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="channel-last"):
        EnsureImageChannels()(np.zeros((8, 8, 3)))


def test_depth_one_volume_is_squeezed():
    out = EnsureImageChannels(channels=1)(np.ones((1, 4, 4, 1)))
    assert out.shape == (1, 4, 4)


def test_rgba_to_rgb(tmp_path):
    rgba = np.zeros((5, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    out = Compose([_load("image"), EnsureImageChannelsd("image", channels=3)])({"image": str(path)})["image"]
    assert out.shape == (3, 5, 6) and out.dtype == torch.float32
    assert out[0].unique().tolist() == [200.0] and out[1:].abs().sum() == 0


def test_grey_to_rgb_repeats():
    grey = torch.arange(6, dtype=torch.uint8).reshape(1, 2, 3)
    out = EnsureImageChannels(channels=3)(grey)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    assert all(torch.equal(out[c], grey[0].float()) for c in range(3))


def test_rgb_to_grey_by_luminance():
    rgb = np.zeros((3, 1, 3), dtype=np.uint8)
    rgb[0, 0, 0], rgb[1, 0, 1], rgb[2, 0, 2] = 255, 255, 255
    out = EnsureImageChannelsd("image", channels=1)({"image": rgb})["image"]
    assert out.shape == (1, 1, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0.299 * 255, 0.587 * 255, 0.114 * 255], rtol=1e-5)


def test_sixteen_bit_image_to_float(tmp_path):
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    out = Compose([_load("image"), EnsureImageChannelsd("image", channels=1)])({"image": str(path)})["image"]
    assert out.dtype == torch.float32 and out.shape == (1, 2, 2)
    assert out[0].tolist() == [[0.0, 1000.0], [40000.0, 65535.0]]
    rgb = EnsureImageChannels(channels=3)(out)
    assert rgb.shape == (3, 2, 2) and rgb.meta["filename_or_obj"] == str(path)


def test_invalid_channels():
    with pytest.raises(ValueError, match="channels"):
        EnsureImageChannelsd("image", channels=2)


def test_sixteen_bit_images_are_mapped_to_the_eight_bit_range_on_request():
    from himix_monai.transforms.mask import EnsureImageChannelsd

    image = torch.tensor([[[0.0, 32896.0], [65535.0, 257.0]]])  # a 16-bit grey image, channel first
    kept = EnsureImageChannelsd(keys="image", channels=1)({"image": image})["image"]
    assert kept.max() == 65535  # default: values untouched (CT in HU must never be rescaled)
    scaled = EnsureImageChannelsd(keys="image", channels=3, rescale_16bit=True)({"image": image})["image"]
    assert scaled.shape == (3, 2, 2)
    assert torch.allclose(scaled[0], torch.tensor([[0.0, 128.0], [255.0, 1.0]]))
    eight_bit = torch.tensor([[[0.0, 255.0]]])
    assert torch.equal(EnsureImageChannelsd(keys="image", channels=1, rescale_16bit=True)({"image": eight_bit})["image"], eight_bit)
