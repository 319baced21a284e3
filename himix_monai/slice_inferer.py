"""
Slice-by-slice inference of a text-guided 2-D network over CT volumes (validation of ``volume_data`` trainings).

MONAI's :py:class:`monai.inferers.SliceInferer` runs a 2-D network over the slices of a volume and stitches the
result, but (MONAI 1.6) it does not pass extra network arguments on, and its window batches mix the slices of all
volumes of the input batch, while HiMix needs each slice's report tokens. :py:class:`TextSliceInferer` is the thin
wrapper that fills that gap: it runs :py:class:`~monai.inferers.SliceInferer` on one volume at a time and gives the
network that volume's ``input_ids`` and ``attention_mask`` repeated to the window batch size, under the same
autocast as :py:class:`himix_monai.inferers.AutocastInferer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import SliceInferer

from himix_monai.inferers import AutocastInferer

__all__ = ["TextSliceInferer"]


class TextSliceInferer(SliceInferer):
    """``SliceInferer`` for a network called as ``network(slices, input_ids, attention_mask)``.

    Args:
        roi_size: the network's in-plane input size ``(H, W)`` (the volumes are resized in-plane to it).
        spatial_dim: the slice axis of the ``(B, C, H, W, D)`` input: 0, 1 or 2 (default 2, the axial axis of a
            NIfTI volume or DICOM series as loaded by MONAI).
        sw_batch_size: slices per network call.
        precision: autocast precision as for :py:class:`~himix_monai.inferers.AutocastInferer`.
        kwargs: other arguments of :py:class:`~monai.inferers.SlidingWindowInferer`.

    Examples::

        inferer = TextSliceInferer(roi_size=(64, 64), sw_batch_size=8)
        masks = inferer(volumes, network, input_ids, attention_mask)  # (B, 1, 64, 64, D)
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        spatial_dim: int = 2,
        sw_batch_size: int = 8,
        precision: str = "fp32",
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_dim, roi_size=tuple(int(s) for s in roi_size), sw_batch_size=sw_batch_size, **kwargs)
        self.autocast = AutocastInferer(precision)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        Args:
            inputs: ``(B, C, H, W, D)`` volumes.
            network: the 2-D network.
            args: per-volume extra inputs of batch size ``B`` (``input_ids``, ``attention_mask``), each repeated to
                the window batch for that volume's slices.
            kwargs: keyword arguments passed to the network unchanged.
        """
        outputs = []
        for b in range(inputs.shape[0]):
            extra = [a[b : b + 1] if isinstance(a, torch.Tensor) else a for a in args]

            def window_network(x: torch.Tensor, *_: Any, extra: list = extra, **__: Any) -> Any:
                repeated = [e.expand(x.shape[0], *e.shape[1:]) if isinstance(e, torch.Tensor) else e for e in extra]
                return self.autocast(x, network, *repeated, **kwargs)

            outputs.append(super().__call__(inputs[b : b + 1], window_network))
        return torch.cat(outputs, dim=0)
