"""
MONAI transforms of the volume read path of bundle inference, and the picture layout of 2-D predictions.

- :py:class:`SliceAxisLastd` puts a volume's axial axis (:py:func:`himix_monai.data.ct.axial_axis`) last, so
  that ``monai.inferers.SliceInferer(spatial_dim=2)`` runs the 2-D network over the slices a radiologist reads;
  ``Invertd`` puts it back before the mask is written;
- :py:class:`ToPictureLayoutd` gives predictions of 2-D NIfTI/DICOM inputs the row/column order of a picture
  before they are written as PNG files.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Orientation

from himix_monai.data.ct import axial_axis
from himix_monai.files import PICTURE_EXTENSIONS
from himix_monai.transforms.mask import meta_filename, source_name

__all__ = ["SliceAxisLastd", "ToPictureLayoutd"]

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class SliceAxisLastd(MapTransform, InvertibleTransform):
    """
    Move the axial axis of a channel-first volume ``(C, X, Y, Z)`` to the last place, without flipping any axis.

    The axial axis is the voxel axis closest to superior-inferior in the volume's affine
    (:py:func:`himix_monai.data.ct.axial_axis`; the last one when none is). The other two axes keep their order
    and direction, so every slice has the layout a 2-D slice of the same data has when loaded on its own (the
    layout training saw). Why not ``Orientationd("RAS")``: it would also flip the in-plane axes, and a text-guided
    network reads "left lung" from the image's layout. This is MONAI's ``Orientation`` with axis codes chosen per
    volume (a pure permutation of its own codes), so the affine follows and ``Invertd`` undoes it.

    Args:
        keys: keys of the channel-first volumes (``MetaTensor`` with an affine).
        allow_missing_keys: don't raise when a key is missing.

    Examples::

        # axis 0 of the stored array runs superior-inferior: (1, 40, 128, 128) -> (1, 128, 128, 40)
        volume = SliceAxisLastd(keys="image")({"image": volume})["image"]
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.orientation = Orientation(axcodes="RAS", labels=_RAS_LABELS)  # axcodes set per volume; one instance,
        # as MONAI's inverse checks that the transform popping a record is the one that pushed it

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import nibabel as nib

        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor) or image.ndim != 4:
                raise ValueError(
                    f"{source_name(image, d, key)}: SliceAxisLastd expects a channel-first 3-D volume (C, X, Y, Z) "
                    f"with its affine, got {type(image).__name__} of shape {tuple(image.shape)}"
                )
            codes = nib.orientations.aff2axcodes(np.asarray(image.affine, dtype=np.float64), labels=_RAS_LABELS)
            if None in codes:
                raise ValueError(
                    f"{source_name(image, d, key)}: degenerate affine (an axis of zero length), "
                    "cannot tell the slice axis"
                )
            axis = axial_axis(image.affine)
            order = [a for a in range(3) if a != axis] + [axis]
            self.orientation.axcodes = "".join(codes[a] for a in order)
            d[key] = self.orientation(image)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the move (``Orientation``'s inverse, from the recorded original affine)."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.orientation.inverse(d[key])
        return d


# --------------------------------------------------------------------------------------------------------------
# output layout


def _source_filename(data: Mapping[Hashable, Any], key: Hashable, image_key: Hashable) -> str | None:
    return meta_filename(data, key) or meta_filename(data, image_key)


class ToPictureLayoutd(MapTransform):
    """
    Swap the two spatial axes of 2-D arrays that come from NIfTI or DICOM files, so they have a picture's
    (rows, columns) order.

    This bundle loads pictures (PNG, JPEG, ...) with ``PILReader(reverse_indexing=False)``: their arrays are
    (rows, columns) and are written back as PNG unchanged (``PILWriter`` with ``reverse_indexing=False``).
    NIfTI and DICOM readers give MONAI's layout (axis 0 = image column), which this transform transposes so
    that the written PNG shows the slice as a viewer does. The source is the ``filename_or_obj`` of the key's
    (or ``image_key``'s) meta data; arrays of pictures or of unknown sources are left alone.

    Args:
        keys: keys of the channel-first 2-D arrays ``(C, H, W)``, e.g. ``["pred", "image"]``.
        image_key: key whose meta data name the source when a key has none.
        picture_extensions: extensions of files loaded as pictures.
        allow_missing_keys: don't raise when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        picture_extensions: Sequence[str] = PICTURE_EXTENSIONS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.picture_extensions = tuple(ext.lower() for ext in picture_extensions)

    def is_picture(self, filename: str | None) -> bool:
        """Whether ``filename`` is loaded as a picture (or unknown, None), i.e. needs no transposition."""
        return filename is None or str(filename).lower().endswith(self.picture_extensions)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.is_picture(_source_filename(d, key, self.image_key)):
                continue
            value = d[key]
            if value.ndim != 3:
                raise ValueError(
                    f"ToPictureLayoutd: {key!r} must be a 2-D channel-first array, got {tuple(value.shape)}"
                )
            d[key] = value.swapaxes(-1, -2) if isinstance(value, np.ndarray) else value.transpose(-1, -2)
        return d
