"""
Ignite handlers of the HiMix bundle.

- :py:class:`VolumeMaskWriter` collects the 2-D slice predictions of CT volumes during inference and writes
  one NIfTI mask per volume, with the source geometry, when the volume's last slice arrives.

The overlay and per-image metric handlers are in :py:mod:`himix_monai.visualize`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monai.config import PathLike
from monai.data import MetaTensor, decollate_batch
from monai.utils import IgniteInfo, convert_to_numpy, min_version, optional_import

from himix_monai.data.ct import slices_to_nifti
from himix_monai.data.inference_items import NUM_SLICES_KEY, SLICE_INDEX_KEY, CTVolumeCache

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["VolumeMaskWriter"]

logger = logging.getLogger(__name__)


def _items(data: Any) -> list:
    """Decollated items of ``engine.state.output`` / ``engine.state.batch``."""
    if isinstance(data, Mapping):
        return list(decollate_batch(data, detach=True))
    if isinstance(data, (list, tuple)):
        return list(data)
    return []


def _filename(item: Mapping[Hashable, Any], key: Hashable) -> str | None:
    value = item.get(key)
    if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj"):
        return str(value.meta["filename_or_obj"])
    meta = item.get(f"{key}_meta_dict")
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return None


def _as_int(value: Any) -> int:
    return int(np.asarray(convert_to_numpy(value)).reshape(-1)[0])


def _volume_stem(path: str) -> str:
    name = Path(path.rstrip("/\\")).name
    for ext in (".nii.gz", ".nii", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


class VolumeMaskWriter:
    """
    Ignite handler stacking per-slice predictions into one NIfTI mask per CT volume.

    For the slice items of :py:func:`himix_monai.data.inference_items.build_inference_items` (``"image"``:
    the volume path, ``"slice_index"``, ``"num_slices"``) run through an evaluator whose post-processing gives
    the binary prediction at the slice's original size (e.g. ``Activationsd`` + ``AsDiscreted`` +
    ``Invertd``). On every ``ITERATION_COMPLETED`` it takes ``pred`` from ``engine.state.output`` and the slice
    index, slice count and volume path from ``engine.state.batch``; when all slices of a volume have arrived it
    writes ``<output_dir>/<volume stem>_<output_postfix><output_ext>`` with
    :py:func:`himix_monai.data.ct.slices_to_nifti` (``uint8`` 0/1, the affine and header of the source, so
    the mask overlays the input voxel for voxel) and frees the slices. A DICOM series is named by its folder.
    Slices may arrive in any order and batches may span volumes. At ``EPOCH_COMPLETED`` a volume with missing
    slices is an error.

    Args:
        output_dir: folder of the masks (created).
        output_postfix: appended to the volume's stem.
        output_ext: ``".nii.gz"`` or ``".nii"``.
        pred_key: key of the binary prediction ``(1, H, W)`` in the output items.
        image_key: key whose ``filename_or_obj`` meta data (or path value) names the volume.
        slice_index_key: key of the slice index in the batch items.
        num_slices_key: key of the number of slices of the volume.
        threshold: predictions are foreground where ``> threshold``.
        volume_cache: the cache the slices were loaded through (``LoadVolumeSliced(cache=...)``), so the
            volume's geometry is not read again; None reads it.

    Examples::

        cache = CTVolumeCache()
        writer = VolumeMaskWriter("out/masks", volume_cache=cache)
        evaluator = SupervisedEvaluator(..., postprocessing=post, val_handlers=[writer])
        evaluator.run()  # out/masks/<volume>_mask.nii.gz; writer.written lists the files

    """

    def __init__(
        self,
        output_dir: PathLike,
        output_postfix: str = "mask",
        output_ext: str = ".nii.gz",
        pred_key: str = "pred",
        image_key: str = "image",
        slice_index_key: str = SLICE_INDEX_KEY,
        num_slices_key: str = NUM_SLICES_KEY,
        threshold: float = 0.5,
        volume_cache: CTVolumeCache | None = None,
    ) -> None:
        if output_ext.lower() not in (".nii.gz", ".nii"):
            raise ValueError(f"output_ext must be '.nii.gz' or '.nii', got {output_ext!r}.")
        self.output_dir = Path(output_dir)
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.pred_key = pred_key
        self.image_key = image_key
        self.slice_index_key = slice_index_key
        self.num_slices_key = num_slices_key
        self.threshold = threshold
        self.volume_cache = volume_cache
        self.written: list[Path] = []
        self._pending: dict[str, tuple[int, dict[int, np.ndarray]]] = {}

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, usually a MONAI ``SupervisedEvaluator``.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check_complete)

    def _reset(self, _engine: Engine) -> None:
        self._pending = {}
        self.written = []

    def output_path(self, volume: str) -> Path:
        """The mask file of ``volume``."""
        suffix = f"_{self.output_postfix}" if self.output_postfix else ""
        return self.output_dir / f"{_volume_stem(volume)}{suffix}{self.output_ext}"

    def add_slice(self, volume: str, index: int, num_slices: int, pred: Any) -> Path | None:
        """
        Store the prediction of one slice; write the volume's mask when it is complete.

        Args:
            volume: the volume path.
            index: the slice index.
            num_slices: the number of slices of the volume.
            pred: the binary prediction of the slice, ``(H, W)`` or ``(1, H, W)``.

        Returns:
            the mask file when this slice completed the volume, else None.
        """
        expected, planes = self._pending.setdefault(volume, (num_slices, {}))
        if expected != num_slices:
            raise ValueError(f"{volume}: slices claim {expected} and {num_slices} slices for the same volume")
        if not 0 <= index < num_slices:
            raise ValueError(f"{volume}: slice index {index} outside 0..{num_slices - 1}")
        plane = np.asarray(convert_to_numpy(pred))
        while plane.ndim > 2 and plane.shape[0] == 1:
            plane = plane[0]
        planes[index] = plane > self.threshold
        if len(planes) < num_slices:
            return None
        del self._pending[volume]
        reference = self.volume_cache.get(volume) if self.volume_cache is not None else volume
        out_path = slices_to_nifti([planes[k] for k in range(num_slices)], reference, self.output_path(volume))
        self.written.append(out_path)
        logger.info("VolumeMaskWriter: wrote %s (%d slices)", out_path, num_slices)
        return out_path

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine whose ``state.output`` / ``state.batch`` hold the current slices.
        """
        outputs = _items(engine.state.output)
        batch = _items(engine.state.batch)
        for position, output in enumerate(outputs):
            source = batch[position] if position < len(batch) else {}
            merged = {**source, **output} if isinstance(source, Mapping) else dict(output)
            volume = _filename(source, self.image_key) if isinstance(source, Mapping) else None
            volume = volume or _filename(merged, self.image_key)
            if volume is None:
                raise KeyError(f"VolumeMaskWriter: cannot tell the volume of item {position} (no {self.image_key!r} file name)")
            for key in (self.slice_index_key, self.num_slices_key):
                if key not in merged:
                    raise KeyError(f"VolumeMaskWriter: item of {volume} has no {key!r}; is it a volume slice item?")
            self.add_slice(
                volume, _as_int(merged[self.slice_index_key]), _as_int(merged[self.num_slices_key]), merged[self.pred_key]
            )

    def _check_complete(self, _engine: Engine) -> None:
        if self._pending:
            details = "; ".join(
                f"{volume}: {len(planes)} of {expected} slices" for volume, (expected, planes) in self._pending.items()
            )
            self._pending = {}
            raise RuntimeError(f"VolumeMaskWriter: volumes with missing slice predictions at the end of the run: {details}")
