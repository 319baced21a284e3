"""
Image and mask channel transforms for 2-D text-guided segmentation.

Published masks come in several forms: 0/255 grey PNG, 0/255 JPEG with compression noise, 3-channel
0/255 (MosMedData+), RGB(A) PNG, 0/1 arrays. Images come as grey, RGB, RGBA, 8- or 16-bit.
:py:class:`BinarizeMaskd` reduces any of these masks to one float channel of 0/1 and
:py:class:`EnsureImageChannelsd` gives images a fixed number of channels. Both expect channel-first
``(C, H, W)`` input, i.e. they run after ``LoadImaged`` + ``EnsureChannelFirstd``, and both name the source
file in their errors when a 3-D volume arrives where a 2-D image is expected.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = [
    "meta_filename",
    "source_name",
    "BinarizeMask",
    "BinarizeMaskd",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
]

# ITU-R BT.601 luma weights, as used by PIL's "L" conversion.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def meta_filename(item: Any, key: Hashable) -> str | None:
    """``filename_or_obj`` of ``item[key]``, from its MetaTensor meta data or ``item[f"{key}_meta_dict"]``."""
    if not isinstance(item, Mapping):
        return None
    value = item.get(key)
    if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj"):
        return str(value.meta["filename_or_obj"])
    meta = item.get(f"{key}_meta_dict")
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return None


def source_name(img: Any, data: Mapping[Hashable, Any] | None = None, key: Hashable | None = None) -> str:
    """
    Name of the file an array came from, for error messages.

    Looks in ``MetaTensor.meta["filename_or_obj"]``, then in ``data[f"{key}_meta_dict"]`` (see
    :py:func:`meta_filename`), then falls back to ``data["image"]`` (the datalist path) and finally to
    ``"<unknown source>"``.
    """
    name = meta_filename({key: img}, key) or (meta_filename(data, key) if data is not None else None)
    if name:
        return name
    if data is not None and isinstance(data.get("image"), str):
        return f"the item with image {data['image']}"
    return "<unknown source>"


def _as_2d_channel_first(img: torch.Tensor, source: str, what: str) -> torch.Tensor:
    """Check for ``(C, H, W)``; squeeze a trailing depth of 1 (a 2-D slice stored as a 3-D file)."""
    if img.ndim == 4 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 4:
        raise ValueError(
            f"{what}: {source} is a 3-D volume of shape {tuple(img.shape)} (channel first), but a 2-D image "
            "(C, H, W) is expected; slice volumes into 2-D images first."
        )
    if img.ndim != 3:
        raise ValueError(
            f"{what}: {source} has shape {tuple(img.shape)}, expected channel-first (C, H, W); "
            "put EnsureChannelFirstd before this transform."
        )
    if img.shape[0] > 4:
        raise ValueError(
            f"{what}: {source} has shape {tuple(img.shape)} with {img.shape[0]} channels; expected 1-4 channels "
            "first. Is it a 3-D volume or a channel-last image without EnsureChannelFirstd?"
        )
    return img


def _drop_alpha(img: torch.Tensor) -> torch.Tensor:
    """RGBA -> RGB and grey+alpha -> grey (channel first)."""
    if img.shape[0] == 4:
        return img[:3]
    if img.shape[0] == 2:
        return img[:1]
    return img


class BinarizeMask(Transform):
    """
    Turn a loaded 2-D mask into a single-channel float mask of 0 and 1.

    Steps, on a channel-first ``(C, H, W)`` mask:

    1. the alpha channel of 2-channel (grey + alpha) and 4-channel (RGBA) masks is dropped;
    2. several channels (MosMedData+ 3-channel masks, RGB JPEG/PNG masks) are reduced to one by the maximum
       over channels, so a pixel is foreground when any colour channel marks it;
    3. the mask is thresholded: foreground is ``mask > threshold``.

    With ``threshold="auto"`` the threshold is chosen per mask from its maximum value:

    - ``max > 127`` (0..255 grey levels, 8-bit PNG/JPEG, also 16-bit 0..65535): threshold 127, so JPEG
      compression noise near 0 and 255 falls on the right side;
    - otherwise (0/1 masks, probabilities, small integer label maps): threshold 0.5.

    Every value above the threshold is foreground, not only 1 or 255: in a label map ``{0, 1, 2}`` labels 1
    and 2 are both lesion, and in a 0..255 mask every grey level above 127 is lesion. Give a number as
    ``threshold`` to fix the rule for a dataset.

    Args:
        threshold: ``"auto"`` or a number; foreground is ``mask > threshold``.

    Raises:
        ValueError: when the input is not a 2-D channel-first mask with 1-4 channels; the message names the
            source file when it is known.
    """

    def __init__(self, threshold: float | str = "auto") -> None:
        if isinstance(threshold, str) and threshold != "auto":
            raise ValueError(f"threshold must be 'auto' or a number, got {threshold!r}.")
        self.threshold = threshold

    def resolve_threshold(self, mask: torch.Tensor) -> float:
        """The threshold used for ``mask``: the fixed one, or 127 / 0.5 from ``mask.max()`` for ``"auto"``."""
        if self.threshold != "auto":
            return float(self.threshold)
        peak = float(mask.max()) if mask.numel() > 0 else 0.0
        return 127.0 if peak > 127 else 0.5

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first mask ``(C, H, W)`` as MetaTensor, tensor or numpy array.
            source: name of the source for error messages (default: from the MetaTensor meta data).

        Returns:
            ``(1, H, W)`` float32 mask of 0 and 1, of the input's type (meta data kept).
        """
        source = source or source_name(img)
        mask = convert_to_tensor(img, track_meta=False)
        mask = _as_2d_channel_first(mask, source, type(self).__name__)
        mask = _drop_alpha(mask).float()
        mask = mask.amax(dim=0, keepdim=True)
        out = (mask > self.resolve_threshold(mask)).to(torch.float32)
        result, *_ = convert_to_dst_type(out, img, dtype=torch.float32)
        return result


class BinarizeMaskd(MapTransform):
    """
    Dictionary wrapper of :py:class:`BinarizeMask`: 1-channel float 0/1 masks from any loaded 2-D mask.

    Args:
        keys: keys of the masks, usually ``"label"``.
        threshold: ``"auto"`` (127 when the mask's maximum is above 127, else 0.5) or a number; foreground is
            ``mask > threshold``, so every value above it (e.g. label 2) is foreground.
        allow_missing_keys: don't raise an exception if a key is missing.

    Examples::

        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
        from himix_monai.transforms.mask import BinarizeMaskd

        load_mask = Compose([
            LoadImaged(keys="label", image_only=True),
            EnsureChannelFirstd(keys="label"),
            BinarizeMaskd(keys="label"),  # (3, H, W) 0/255 MosMedData+ mask -> (1, H, W) 0/1 float
        ])

    """

    def __init__(self, keys: KeysCollection, threshold: float | str = "auto", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.binarize = BinarizeMask(threshold=threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarize(d[key], source=source_name(d[key], d, key))
        return d


class EnsureImageChannels(Transform):
    """
    Give a 2-D channel-first image a fixed number of channels, as float32.

    - the alpha channel is dropped (RGBA -> RGB, grey + alpha -> grey);
    - ``channels=3``: grey is repeated to RGB;
    - ``channels=1``: RGB is converted to grey by luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B);
    - the values are cast to float32 without rescaling (16-bit images keep 0..65535; scale intensities
      with e.g. ``ScaleIntensityd`` afterwards);
    - a trailing depth of 1 (a 2-D slice stored as a 3-D file) is squeezed;
    - ``rescale_16bit=True`` (for pipelines that expect 8-bit pictures, e.g. an intensity range of 0..255): an
      image with values above 255 is taken as 16-bit and mapped to 0..255 (divided by 257), so a 16-bit PNG
      looks like its 8-bit version instead of being clipped to white.

    Args:
        channels: 1 or 3.
        rescale_16bit: map 16-bit images (values above 255) to the 8-bit range.

    Raises:
        ValueError: when the input is a 3-D volume or not channel-first; the message names the source file.
    """

    def __init__(self, channels: int = 3, rescale_16bit: bool = False) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        self.channels = channels
        self.rescale_16bit = rescale_16bit

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first image ``(C, H, W)`` (C in 1..4) as MetaTensor, tensor or numpy array.
            source: name of the source for error messages (default: from the MetaTensor meta data).

        Returns:
            ``(channels, H, W)`` float32 image of the input's type (meta data kept).
        """
        source = source or source_name(img)
        x = convert_to_tensor(img, track_meta=False)
        x = _drop_alpha(_as_2d_channel_first(x, source, type(self).__name__)).float()
        if self.rescale_16bit and x.numel() and x.max() > 255:
            x = x / 257.0  # 65535 -> 255
        if self.channels == 3 and x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        elif self.channels == 1 and x.shape[0] == 3:
            weights = torch.tensor(_LUMA_WEIGHTS, dtype=x.dtype, device=x.device).view(3, 1, 1)
            x = (x * weights).sum(dim=0, keepdim=True)
        result, *_ = convert_to_dst_type(x, img, dtype=torch.float32)
        return result


class EnsureImageChannelsd(MapTransform):
    """
    Dictionary wrapper of :py:class:`EnsureImageChannels`: RGBA -> RGB, grey <-> RGB, float32.

    Args:
        keys: keys of the images, usually ``"image"``.
        channels: 1 or 3 output channels.
        rescale_16bit: map 16-bit images (values above 255) to the 8-bit range, see :py:class:`EnsureImageChannels`.
        allow_missing_keys: don't raise an exception if a key is missing.

    Examples::

        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
        from himix_monai.transforms.mask import EnsureImageChannelsd

        load_image = Compose([
            LoadImaged(keys="image", image_only=True),
            EnsureChannelFirstd(keys="image"),
            EnsureImageChannelsd(keys="image", channels=3),  # grey, RGB or RGBA -> (3, H, W) float32
        ])

    """

    def __init__(
        self, keys: KeysCollection, channels: int = 3, rescale_16bit: bool = False, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ensure_channels = EnsureImageChannels(channels=channels, rescale_16bit=rescale_16bit)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.ensure_channels(d[key], source=source_name(d[key], d, key))
        return d
