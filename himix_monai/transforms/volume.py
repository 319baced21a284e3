"""
MONAI transforms for CT-volume inputs of bundle inference: slices of a volume in, picture layout out.

- :py:class:`LoadVolumeSliced` loads the windowed slice ``k`` of a slice item of
  :py:func:`~himix_monai.data.inference_items.build_inference_items` (the volume is read once and kept in a
  :py:class:`CTVolumeCache`, which :py:class:`~himix_monai.handlers.VolumeMaskWriter` shares to stack the slice
  predictions back into one NIfTI mask with the source geometry);
- :py:class:`ToPictureLayoutd` gives predictions of 2-D NIfTI/DICOM inputs the row/column order of a picture
  before they are written as PNG files.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from himix_monai.data.ct import DEFAULT_WINDOW, CTReadError, CTVolume, WindowLike, hu_window, read_ct_volume, resolve_window
from himix_monai.data.inference_items import NUM_SLICES_KEY, SLICE_INDEX_KEY, InferenceInputError
from himix_monai.files import PICTURE_EXTENSIONS
from himix_monai.transforms.mask import meta_filename

__all__ = ["CTVolumeCache", "LoadVolumeSliced", "ToPictureLayoutd"]


# --------------------------------------------------------------------------------------------------------------
# volume slices


class CTVolumeCache:
    """
    The last few CT volumes read with :py:func:`~himix_monai.data.ct.read_ct_volume`, keyed by path.

    Shared by :py:class:`LoadVolumeSliced` (which reads slice after slice of one volume) and
    :py:class:`~himix_monai.handlers.VolumeMaskWriter` (which needs the volume's geometry when writing its
    mask), so a volume is read once. An entry is reread when its file or folder has changed. The cache is
    emptied when pickled (e.g. into DataLoader workers, which then keep their own).

    Args:
        max_volumes: number of volumes kept (2: the volume being read and the one being written).
    """

    def __init__(self, max_volumes: int = 2) -> None:
        if max_volumes < 1:
            raise ValueError(f"max_volumes must be at least 1, got {max_volumes}.")
        self.max_volumes = int(max_volumes)
        self._volumes: OrderedDict[str, tuple[int, CTVolume]] = OrderedDict()

    @staticmethod
    def _stamp(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return -1

    def get(self, path: str | os.PathLike) -> CTVolume:
        """The volume at ``path`` (a DICOM series folder, a NIfTI file or a DICOM file), read on first use.

        Raises:
            CTReadError: see :py:func:`~himix_monai.data.ct.read_ct_volume`.
        """
        key = os.fspath(path)
        stamp = self._stamp(Path(key))
        entry = self._volumes.get(key)
        if entry is not None and entry[0] == stamp:
            self._volumes.move_to_end(key)
            return entry[1]
        volume = read_ct_volume(key, allow_single_slice=True)
        self._volumes[key] = (stamp, volume)
        self._volumes.move_to_end(key)
        while len(self._volumes) > self.max_volumes:
            self._volumes.popitem(last=False)
        return volume

    def clear(self) -> None:
        """Forget all volumes."""
        self._volumes.clear()

    def __len__(self) -> int:
        return len(self._volumes)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_volumes"] = OrderedDict()
        return state


class LoadVolumeSliced(MapTransform):
    """
    Load slice ``d["slice_index"]`` of the CT volume at ``d[key]``, windowed to [0, 1], as a ``(1, H, W)`` image.

    For the slice items of :py:func:`~himix_monai.data.inference_items.build_inference_items`. The volume is read with
    :py:func:`~himix_monai.data.ct.read_ct_volume` (HU, DICOM series sorted by position) through a
    :py:class:`CTVolumeCache`, so consecutive slices of one volume read it once. The slice is taken along the
    volume's slice axis in MONAI layout (for DICOM: axis 0 = image column, as ``PydicomReader`` and the demo
    data) and mapped to [0, 1] with :py:func:`~himix_monai.data.ct.hu_window`. The output is a ``MetaTensor``
    whose meta data hold ``filename_or_obj`` (the volume), ``slice_index`` and ``spatial_shape``, so MONAI's
    invertible transforms (``Resized``) and ``Invertd`` work on it.

    Args:
        keys: key(s) of the volume path, usually ``"image"``.
        window: CT window: a preset name (``"lung"``, ``"mediastinum"``, ``"abdomen"``, ``"bone"``), a
            ``(low, high)`` HU pair or ``{"center": c, "width": w}``.
        slice_index_key: key of the slice index.
        num_slices_key: key of the expected number of slices (checked against the volume read), or None.
        cache: the volume cache; a new one by default (share it with ``VolumeMaskWriter``).
        allow_missing_keys: don't raise when a key is missing.

    Raises:
        InferenceInputError: naming the volume, when it cannot be read, the slice index is out of range or the
            number of slices differs from the item's.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        window: WindowLike = DEFAULT_WINDOW,
        slice_index_key: str = SLICE_INDEX_KEY,
        num_slices_key: str | None = NUM_SLICES_KEY,
        cache: CTVolumeCache | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = resolve_window(window)
        self.slice_index_key = slice_index_key
        self.num_slices_key = num_slices_key
        self.cache = cache if cache is not None else CTVolumeCache()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        index = int(d[self.slice_index_key])
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            try:
                volume = self.cache.get(path)
            except CTReadError as err:
                raise InferenceInputError(str(err)) from err
            if not 0 <= index < volume.num_slices:
                raise InferenceInputError(
                    f"{path}: slice {index} requested, the volume has {volume.num_slices} slices"
                )
            expected = d.get(self.num_slices_key) if self.num_slices_key is not None else None
            if expected is not None and int(expected) != volume.num_slices:
                raise InferenceInputError(
                    f"{path}: the item expects {int(expected)} slices, the volume read has {volume.num_slices}"
                )
            slicer = [slice(None)] * volume.hu.ndim
            slicer[volume.slice_axis] = index  # a view: np.take would copy the whole volume for every slice
            plane = hu_window(volume.hu[tuple(slicer)], self.window)
            meta = {
                "filename_or_obj": path,
                self.slice_index_key: index,
                "spatial_shape": np.asarray(plane.shape),
            }
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(plane[None])), meta=meta)
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
                raise ValueError(f"ToPictureLayoutd: {key!r} must be a 2-D channel-first array, got {tuple(value.shape)}")
            d[key] = value.swapaxes(-1, -2) if isinstance(value, np.ndarray) else value.transpose(-1, -2)
        return d
