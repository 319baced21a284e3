"""
CT transforms for 2-D text-guided segmentation inputs.

- :py:class:`CTWindow` / :py:class:`CTWindowd` map Hounsfield units to [0, 1] through a named or custom
  window (a validated wrapper of :py:class:`monai.transforms.ScaleIntensityRange`);
- :py:class:`EnsureSingleSlice` / :py:class:`EnsureSingleSliced` check that a loaded, channel-first image is
  one 2-D slice (a trailing singleton slice axis is dropped) and name the file when it is a 3-D volume.

``LoadImaged`` already returns HU for CT data (``PydicomReader`` applies RescaleSlope/RescaleIntercept and
``NibabelReader`` applies scl_slope/scl_inter), so the window goes directly after loading::

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    transform = Compose([
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        EnsureSingleSliced(keys=["image", "label"]),
        CTWindowd(keys="image", window="lung"),  # -1000..400 HU -> 0..1
    ])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np

from monai.config import KeysCollection
from monai.config.type_definitions import DtypeLike, NdarrayOrTensor
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from monai.utils import TransformBackends

from himix_monai.data.ct import DEFAULT_WINDOW, WindowLike, resolve_window

__all__ = ["CTWindow", "CTWindowd", "EnsureSingleSlice", "EnsureSingleSliced"]


class CTWindow(Transform):
    """Map HU linearly from a CT window's (low, high) to (0, 1), clipping values outside the window.

    Args:
        window: a preset name from :py:data:`himix_monai.data.ct.WINDOW_PRESETS` (``"lung"``,
            ``"mediastinum"``, ``"abdomen"``, ``"bone"``), a ``(low, high)`` HU pair or a
            ``{"center": c, "width": w}`` mapping; validated at construction.
        clip: clip the output to [0, 1].
        dtype: output data type.

    Examples::

        >>> import torch
        >>> CTWindow("lung")(torch.tensor([[-1000.0, -300.0, 400.0]]))  # a MetaTensor when meta tracking is on
        metatensor([[0.0000, 0.5000, 1.0000]])
    """

    backend = ScaleIntensityRange.backend

    def __init__(self, window: WindowLike = DEFAULT_WINDOW, clip: bool = True, dtype: DtypeLike = np.float32) -> None:
        self.window = resolve_window(window)
        low, high = self.window
        self.scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=clip, dtype=dtype)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Window ``img`` (HU)."""
        return self.scale(img)


class CTWindowd(MapTransform):
    """Dictionary-based :py:class:`CTWindow`.

    Args:
        keys: keys of the HU images to window.
        window: see :py:class:`CTWindow`.
        clip: clip the output to [0, 1].
        dtype: output data type.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = CTWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        window: WindowLike = DEFAULT_WINDOW,
        clip: bool = True,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.windower = CTWindow(window=window, clip=clip, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.windower(d[key])
        return d


def _source_name(img: Any) -> str:
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "image"


class EnsureSingleSlice(Transform):
    """Check that a channel-first image is a single 2-D slice ``(C, H, W)``.

    A trailing singleton slice axis ``(C, H, W, 1)``, as loaded from a one-slice NIfTI volume, is dropped
    (MetaTensor metadata is kept). Anything else raises an error naming the source file.

    Raises:
        ValueError: for a 3-D volume with several slices, or fewer than 2 spatial dimensions.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Return ``img`` as ``(C, H, W)``."""
        spatial = tuple(img.shape[1:])
        if len(spatial) == 2:
            return img
        if len(spatial) == 3 and spatial[-1] == 1:
            return img[..., 0]
        raise ValueError(
            f"{_source_name(img)}: expected a single 2-D slice (channel-first shape (C, H, W)), "
            f"got shape {tuple(img.shape)}; extract the slices of 3-D volumes first "
            "(himix_monai.data.ct.volume_to_slices)"
        )


class EnsureSingleSliced(MapTransform):
    """Dictionary-based :py:class:`EnsureSingleSlice`.

    Args:
        keys: keys of the channel-first images to check.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = EnsureSingleSlice.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = EnsureSingleSlice()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.checker(d[key])
        return d
