"""
2.5D context for CT volumes: neighbouring slices as input channels (``context_slices = k``).

For slice ``i`` of a volume the network sees slices ``i-k .. i+k`` as channels; the image encoder's first
convolution then takes ``(2k+1) * in_channels`` channels (:py:func:`network_in_channels`). With pretrained timm
weights, timm adapts the RGB stem to that many channels by repeating its filters and scaling them by
``3 / channels`` (``timm.models.adapt_input_conv``); the project keeps that scheme. ``k = 0`` is the 2-D model
and changes nothing.

- :py:class:`StackNeighbourSlices` / :py:class:`StackNeighbourSlicesd`: ``(C, H, W, D)`` -> ``(C*(2k+1), H, W, D)``;
  channel block ``j`` (``j = 0 .. 2k``) of slice ``i`` holds slice ``i + j - k``. At the two ends of the volume the
  missing neighbours are the **edge slice repeated** (``i + j - k`` clamped to ``0 .. D-1``), not zeros: a zero slice
  would look like air, which never borders lung on a real scan.
- :py:class:`EnsureContextVolume` / :py:class:`EnsureContextVolumed`: a model with ``k > 0`` needs volumes; a 2-D
  picture or a single 2-D slice (e.g. a MONAI Label request on one image) stops with an error naming the file.
- :py:func:`check_context_route`, :py:func:`network_in_channels`: checks of the bundle settings.
- :py:func:`slices_as_items`: per-slice pairs of a volume prediction, for per-slice Dice next to per-volume Dice.

Order in a volume pipeline (training and inference)::

    LoadImaged -> EnsureChannelFirstd -> ScaleIntensityRanged -> EnsureContextVolumed -> StackNeighbourSlicesd
    -> Resized(in-plane) -> (training: RandCropByPosNegLabeld((-1, -1, 1)) + SqueezeDimd; inference: SliceInferer)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor

from himix_monai.errors import HiMixError, SettingError
from himix_monai.transforms.mask import source_name

__all__ = [
    "ContextSlicesError",
    "EnsureContextVolume",
    "EnsureContextVolumed",
    "StackNeighbourSlices",
    "StackNeighbourSlicesd",
    "check_context_route",
    "network_in_channels",
    "slices_as_items",
    "validate_context_slices",
]


class ContextSlicesError(HiMixError, ValueError):
    """A model trained with ``context_slices > 0`` got an input that has no neighbouring slices."""


def validate_context_slices(context_slices: Any) -> int:
    """``context_slices`` as a non-negative int (text from the command line is accepted).

    Args:
        context_slices: the setting.

    Raises:
        SettingError: for anything but a whole number >= 0.
    """
    try:
        value = int(str(context_slices).strip()) if not isinstance(context_slices, bool) else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise SettingError(
            f"context_slices must be a whole number >= 0 (0: 2-D, 1: slices i-1..i+1, ...), got {context_slices!r}"
        )
    return value


def network_in_channels(in_channels: int, context_slices: Any = 0) -> int:
    """The network's input channels for images of ``in_channels`` channels with ``context_slices`` neighbours on
    each side: ``in_channels * (2 * context_slices + 1)``.

    Args:
        in_channels: channels of one slice (1 for CT).
        context_slices: ``k``.

    Examples::

        >>> network_in_channels(1, 0), network_in_channels(1, 1), network_in_channels(1, 2)
        (1, 3, 5)
    """
    return int(in_channels) * (2 * validate_context_slices(context_slices) + 1)


def check_context_route(context_slices: Any, volume_data: Any) -> int:
    """Stop a training with ``context_slices > 0`` on 2-D pictures (there are no neighbouring slices to stack).

    Args:
        context_slices: ``k``.
        volume_data: whether the datalist holds volumes (booleans given as text are read as such).

    Returns:
        ``k`` as an int.

    Raises:
        SettingError: ``k > 0`` without volume data.
    """
    from himix_monai.config_utils import as_bool

    k = validate_context_slices(context_slices)
    if k > 0 and not as_bool(volume_data, "volume_data"):
        raise SettingError(
            f"context_slices={k} needs volumes: the datalist is read as 2-D pictures (volume_data is false). Give a "
            "datalist of NIfTI volumes or DICOM series with --volume_data true, or train a 2-D model with "
            "--context_slices 0."
        )
    return k


class StackNeighbourSlices(Transform):
    """Put the ``k`` slices on each side of every slice into the channels: ``(C, H, W, D)`` -> ``(C*(2k+1), H, W, D)``.

    Channel block ``j`` (channels ``j*C .. (j+1)*C - 1``, ``j = 0 .. 2k``) of slice ``i`` is slice ``i + j - k`` of the
    input; the middle block (``j = k``) is the slice itself. Edges: neighbours beyond the first or last slice are the
    edge slice repeated (index clamped), so every output slice is a real CT slice. ``k = 0`` returns the input
    unchanged. The meta data (affine, file name) is kept; the transform is not spatial, so ``Invertd`` has nothing
    to undo.

    Args:
        context_slices: ``k`` >= 0.
        slice_dim: the spatial dimension along which the slices lie (default: the last, the axial axis of a
            NIfTI volume or DICOM series as loaded by MONAI).

    Examples::

        >>> volume = torch.arange(4.0).reshape(1, 1, 1, 4)  # slices 0, 1, 2, 3
        >>> StackNeighbourSlices(1)(volume)[:, 0, 0]
        tensor([[0., 0., 1., 2.],
                [0., 1., 2., 3.],
                [1., 2., 3., 3.]])
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, context_slices: int = 1, slice_dim: int = -1) -> None:
        self.context_slices = validate_context_slices(context_slices)
        self.slice_dim = slice_dim

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first volume ``(C, H, W, D)``.
        """
        k = self.context_slices
        if k == 0:
            return img
        if img.ndim != 4:
            raise ContextSlicesError(
                f"StackNeighbourSlices: {source_name(img)} has shape {tuple(img.shape)}; a channel-first volume "
                "(C, H, W, D) is expected (put EnsureChannelFirstd and EnsureContextVolumed before it)."
            )
        tensor = img if isinstance(img, torch.Tensor) else convert_to_tensor(img, track_meta=True)
        dim = self.slice_dim % tensor.ndim
        if dim == 0:
            raise ValueError("slice_dim must be a spatial dimension, not the channel dimension 0")
        depth = tensor.shape[dim]
        index = torch.arange(depth, device=tensor.device)
        blocks = [tensor.index_select(dim, (index + offset).clamp(0, depth - 1)) for offset in range(-k, k + 1)]
        return torch.cat(blocks, dim=0)


class StackNeighbourSlicesd(MapTransform):
    """Dictionary version of :py:class:`StackNeighbourSlices` (apply it to the image key only, not the label).

    Args:
        keys: keys of the volumes.
        context_slices: ``k`` >= 0 (0: no change).
        slice_dim: the spatial dimension of the slices (default: the last).
        allow_missing_keys: don't raise for a missing key.

    Examples::

        transform = StackNeighbourSlicesd(keys="image", context_slices=1)
        transform({"image": volume})["image"].shape  # (1, 64, 64, 24) -> (3, 64, 64, 24)
    """

    def __init__(
        self, keys: KeysCollection, context_slices: int = 1, slice_dim: int = -1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.stacker = StackNeighbourSlices(context_slices, slice_dim)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.stacker(d[key])
        return d


class EnsureContextVolume(Transform):
    """Stop with a clear error when a model with ``context_slices > 0`` meets a 2-D picture or a single 2-D slice.

    Such a model was trained on slices stacked with their neighbours; a 2-D input has none, and feeding it would
    fail deep in the first convolution ("expected input to have 3 channels") or, worse, give a mask from a
    picture repeated into every channel. With ``k = 0`` every input passes unchanged.

    A channel-first input ``(C, H, W)``, or ``(C, H, W, D)`` with fewer than 2 slices, is refused. Put it after
    ``EnsureChannelFirstd`` and before :py:class:`StackNeighbourSlicesd`, in the inference path (the MONAI Label route
    goes through the same preprocessing, so single-image requests are stopped here too).

    Args:
        context_slices: ``k`` of the model.

    Raises:
        ContextSlicesError: naming the file, ``k`` and what to do.

    Examples::

        >>> EnsureContextVolume(1)(torch.zeros(1, 64, 64))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ContextSlicesError: ... this model needs volumes (context_slices=1) ...
    """

    def __init__(self, context_slices: int = 0) -> None:
        self.context_slices = validate_context_slices(context_slices)

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: the loaded, channel-first image.
            source: name of the input for the message (default: from the MetaTensor meta data).
        """
        k = self.context_slices
        if k == 0 or (img.ndim == 4 and img.shape[-1] >= 2):
            return img
        what = "a 2-D picture or slice" if img.ndim <= 3 else f"a volume of {img.shape[-1]} slice"
        raise ContextSlicesError(
            f"{source or source_name(img)}: this model needs volumes (context_slices={k}): it was trained on CT slices "
            f"stacked with the {k} slice(s) above and below, but got {what} (shape {tuple(img.shape)}, channel first). "
            "Give a NIfTI volume or a DICOM series folder, or use a model trained with context_slices=0 for 2-D "
            "pictures, single slices and MONAI Label requests on single 2-D images."
        )


class EnsureContextVolumed(MapTransform):
    """Dictionary version of :py:class:`EnsureContextVolume`.

    Args:
        keys: keys of the images to check (usually ``"image"``).
        context_slices: ``k`` of the model.
        allow_missing_keys: don't raise for a missing key.
    """

    def __init__(self, keys: KeysCollection, context_slices: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = EnsureContextVolume(context_slices)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.checker(d[key], source_name(d[key], d, key))
        return d


def slices_as_items(batch: Sequence[Sequence[torch.Tensor]], slice_dim: int = -1) -> tuple[list, list]:
    """Split volume predictions and labels into one item per slice, for per-slice metrics.

    Args:
        batch: ``(predictions, labels)``, lists of channel-first volumes ``(C, H, W, D)`` (what
            ``monai.handlers.from_engine(["pred", "label"])`` gives for a volume evaluator).
        slice_dim: the spatial dimension of the slices (default: the last).

    Returns:
        ``(predictions, labels)`` as lists of ``(C, H, W)`` slices, in volume order.

    Examples::

        output_transform = lambda out: slices_as_items(from_engine(["pred", "label"])(out))
    """
    predictions, labels = batch
    split_pred = [s for volume in predictions for s in torch.unbind(torch.as_tensor(volume), dim=slice_dim)]
    split_label = [s for volume in labels for s in torch.unbind(torch.as_tensor(volume), dim=slice_dim)]
    return split_pred, split_label
