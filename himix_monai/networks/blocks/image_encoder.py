"""Multi-scale image encoder of HiMix: a timm backbone with ``features_only=True`` (paper Sec. 3.2)."""

from __future__ import annotations

import os

import timm
import torch
import torch.nn as nn

__all__ = ["TimmImageEncoder"]


class TimmImageEncoder(nn.Module):
    """A timm backbone returning one feature map per stage, finest first.

    The default ``convnext_tiny`` gives 4 stages with strides 4/8/16/32 and 96/192/384/768 channels, i.e.
    56/28/14/7 pixels at a 224 input.

    Args:
        name: timm model name (any model that supports ``features_only=True``).
        in_channels: image channels; 1 for CT or X-ray, 3 for RGB. With pretrained weights timm adapts the stem
            (summing the RGB filters for one channel).
        pretrained: load timm's pretrained weights (from the hub or timm's local cache).
        checkpoint_path: a local weights file (``.pth``/``.bin``/``.safetensors``) for the backbone, loaded
            through timm's own checkpoint filter, so an ImageNet ConvNeXt checkpoint works offline.

    Examples::

        >>> encoder = TimmImageEncoder("convnext_tiny", in_channels=1)
        >>> [f.shape[1:] for f in encoder(torch.randn(1, 1, 224, 224))]
        [torch.Size([96, 56, 56]), torch.Size([192, 28, 28]), torch.Size([384, 14, 14]), torch.Size([768, 7, 7])]
    """

    def __init__(
        self,
        name: str = "convnext_tiny",
        in_channels: int = 3,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        kwargs: dict = {"features_only": True, "in_chans": in_channels}
        if checkpoint_path is not None:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"image encoder checkpoint not found: {checkpoint_path}")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.fspath(checkpoint_path)})
        else:
            kwargs["pretrained"] = pretrained
        self.backbone = timm.create_model(name, **kwargs)
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        self.reductions: list[int] = list(self.backbone.feature_info.reduction())

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(image))
