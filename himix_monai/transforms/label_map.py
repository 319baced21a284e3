"""
The label map a client such as MONAI Label expects from a 2-D segmentation bundle.

The bundle's postprocessing gives a channel-first binary mask ``(1, ...)`` at the input image's size, which is
what its own writers (PNG masks, overlays, NIfTI volumes) take. MONAI Label (0.8.5) appends its ``Restored``
transform to the bundle's ``postprocessing`` and writes the result as the returned label file. ``Restored`` drops
the channel only for predictions of more than three dimensions, and its writer transposes the array before ITK
writes it (MONAI's layout, axis 0 = image column, to ITK's). A 2-D bundle therefore has to hand over a 2-D map
in MONAI's layout, of the image's ``spatial_shape``, with the integer label ids of ``channel_def``:
:py:class:`AsLabelMapd` does that.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import get_equivalent_dtype

from himix_monai.files import PICTURE_EXTENSIONS
from himix_monai.transforms.mask import meta_filename

__all__ = ["AsLabelMapd"]


def _spatial_shape(data: Mapping[Hashable, Any], key: Hashable) -> tuple[int, ...] | None:
    """``spatial_shape`` of ``data[key]`` as loaded (MetaTensor meta data or ``f"{key}_meta_dict"``)."""
    value = data.get(key)
    meta = value.meta if isinstance(value, MetaTensor) else data.get(f"{key}_meta_dict")
    shape = meta.get("spatial_shape") if isinstance(meta, Mapping) else None
    return None if shape is None else tuple(int(s) for s in np.asarray(shape).reshape(-1))


class AsLabelMapd(MapTransform):
    """
    Turn a channel-first one-channel 2-D binary mask ``(1, A, B)`` into a 2-D label map in MONAI's layout
    (axis 0 = image column), of integer type, with ``label`` where the mask is set and 0 elsewhere.

    Pictures (PNG, JPEG, ...) are loaded by this bundle with ``PILReader(reverse_indexing=False)`` as
    (rows, columns); their maps are transposed to MONAI's layout, which is the layout of the ``spatial_shape``
    that ``PILReader`` records (width, height) and of the identity affine it gives. NIfTI and DICOM inputs are
    in MONAI's layout already. When the image's ``spatial_shape`` is known, the map must have exactly that
    shape, or a ``ValueError`` names the file: a map of another size would be placed wrongly by a viewer.

    MONAI Label's ``Restored`` keeps such a map as it is (it drops the channel only for predictions of more than
    three dimensions) and its writer gives a label file of the image's layout and size.

    Args:
        keys: keys of the channel-first masks, e.g. ``"pred"``.
        image_key: key of the input image, whose meta data name the source file and its ``spatial_shape``.
        label: label id of the foreground, the ``channel_def`` key of the lesion in ``metadata.json``.
        dtype: integer dtype of the map.
        picture_extensions: extensions of files loaded as pictures, i.e. in (rows, columns) order.
        allow_missing_keys: don't raise when a key is missing.

    Examples::

        >>> post = Compose([Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5),
        ...                 Invertd("pred", transform=pre, orig_keys="image"), AsLabelMapd("pred")])  # doctest: +SKIP
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        label: int = 1,
        dtype: DtypeLike | torch.dtype = np.uint8,
        picture_extensions: Sequence[str] = PICTURE_EXTENSIONS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.dtype = get_equivalent_dtype(dtype, torch.Tensor)
        if self.dtype.is_floating_point or self.dtype.is_complex or self.dtype == torch.bool:
            raise ValueError(f"AsLabelMapd: dtype must be an integer type, got {dtype}")
        if not 0 < int(label) <= torch.iinfo(self.dtype).max:
            raise ValueError(f"AsLabelMapd: label must be in 1..{torch.iinfo(self.dtype).max} for {dtype}, got {label}")
        self.label = int(label)
        self.picture_extensions = tuple(ext.lower() for ext in picture_extensions)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = meta_filename(d, self.image_key)
        expected = _spatial_shape(d, self.image_key)
        for key in self.key_iterator(d):
            mask = d[key]
            name = source or meta_filename(d, key) or "<unknown source>"
            if mask.ndim != 3 or mask.shape[0] != 1:
                raise ValueError(
                    f"AsLabelMapd: {key!r} of {name} must be a one-channel 2-D mask (1, H, W), got {tuple(mask.shape)}"
                )
            mask = torch.as_tensor(mask)[0]
            if source is not None and source.lower().endswith(self.picture_extensions):
                mask = mask.transpose(0, 1)
            label_map = (mask > 0).to(self.dtype) * self.label
            if expected is not None and tuple(label_map.shape) != expected:
                raise ValueError(
                    f"AsLabelMapd: the label map of {name} has shape {tuple(label_map.shape)}, the image's "
                    f"spatial_shape is {expected}; invert the preprocessing (Invertd) before this transform"
                )
            d[key] = label_map
        return d
