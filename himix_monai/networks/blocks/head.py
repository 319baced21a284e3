"""The segmentation head of HiMix (Eq. 9), computed with its two linear convolutions folded into one."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import SubpixelUpsample, UnetOutBlock
from monai.networks.utils import pixelshuffle

__all__ = ["subpixel_segmentation_head"]


def _plain_conv(module: nn.Module) -> nn.Conv2d | None:
    """The ``nn.Conv2d`` a block consists of, or ``None`` when it does more than one convolution."""
    if isinstance(module, nn.Conv2d):
        return module
    children = list(module.children())
    if len(children) == 1:
        return _plain_conv(children[0])
    return None


def subpixel_segmentation_head(features: torch.Tensor, upsample: SubpixelUpsample, head: UnetOutBlock) -> torch.Tensor:
    """``head(upsample(features))``, with the two convolutions folded into one.

    The head of Eq. 9 is linear up to the output: a 3x3 convolution to ``C * r^2`` channels, a pixel shuffle by
    ``r``, an optional zero-padded ``r x r`` average pool (the blur of ``SubpixelUpsample``) and a 1x1
    convolution to the output channels. A 1x1 convolution commutes with the pixel shuffle and with the blur
    (the blur acts per channel and maps zero to zero; the 1x1 bias is added after it), so the 1x1 weights can
    be multiplied into the 3x3 convolution first: ``out_channels * r^2`` output channels instead of ``C * r^2``
    (16 instead of 384 for ConvNeXt-Tiny, a 2.1 GFLOP convolution at 224x224 becomes a 0.09 GFLOP one), and the
    pixel shuffle and the blur run on ``out_channels`` maps instead of ``C``. The folded weights are computed
    in every call from the modules' own parameters, so the state dict, the gradients and the result are those
    of the unfolded head (equal up to floating-point rounding). Falls back to ``head(upsample(x))`` when
    either block is not a single plain convolution.

    Args:
        features: ``(B, C_in, H, W)``.
        upsample: MONAI ``SubpixelUpsample`` built with its default convolution.
        head: MONAI ``UnetOutBlock`` (a 1x1 convolution).

    Returns:
        ``(B, out_channels, r * H, r * W)``.

    Examples::

        >>> up, out = SubpixelUpsample(2, 96, 24, scale_factor=4), UnetOutBlock(2, 24, 1)
        >>> subpixel_segmentation_head(torch.randn(1, 96, 56, 56), up, out).shape
        torch.Size([1, 1, 224, 224])
    """
    up_conv = _plain_conv(upsample.conv_block)
    out_conv = _plain_conv(head)
    if up_conv is None or out_conv is None or out_conv.kernel_size != (1, 1) or features.ndim != 4:
        return head(upsample(features))
    scale = upsample.scale_factor
    sub_pixels = scale * scale
    out_weight = out_conv.weight.flatten(1)  # (O, C)
    channels = out_weight.shape[1]
    up_weight = up_conv.weight.reshape(channels, sub_pixels, *up_conv.weight.shape[1:])  # (C, r^2, C_in, k, k)
    with torch.autocast(features.device.type, enabled=False):  # the fold itself in the weights' precision
        weight = torch.einsum("oc,cs...->os...", out_weight, up_weight).flatten(0, 1)  # (O * r^2, C_in, k, k)
        bias = None
        if up_conv.bias is not None:
            bias = (out_weight @ up_conv.bias.reshape(channels, sub_pixels)).flatten()  # (O * r^2,)
    logits = F.conv2d(features, weight, bias, stride=up_conv.stride, padding=up_conv.padding)
    logits = upsample.pad_pool(pixelshuffle(logits, 2, scale))
    if out_conv.bias is not None:
        logits = logits + out_conv.bias.reshape(1, -1, 1, 1).to(logits.dtype)
    return logits
