"""Multi-scale image encoder of HiMix: a timm backbone with ``features_only=True`` (paper Sec. 3.2)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
import torch.nn as nn

__all__ = ["CPUDepthwiseConv2d", "TimmImageEncoder", "use_cpu_depthwise_convs"]


class CPUDepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` that runs in channels-last memory format on the CPU, and in float32 under autocast.

    oneDNN's depthwise kernels on the CPU are much faster on channels-last tensors, and under bf16 autocast
    slower in bf16 than in float32. For the 7x7 depthwise convolution of ConvNeXt-Tiny's first stage at
    8x96x56x56 (forward + backward, 2-core Xeon with AMX): 154 ms contiguous float32, 156 ms contiguous bf16,
    69 ms channels-last float32. Elsewhere (CUDA) it is a plain ``nn.Conv2d``. Parameters, state dict and
    results are those of ``nn.Conv2d``; only the memory format (and, under CPU autocast with float32 weights,
    the dtype: float32) of the output differ. Weights stored in a lower precision are used as they are.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (the name nn.Conv2d uses)
        if torch.jit.is_scripting() or input.device.type != "cpu":  # TorchScript: a plain convolution
            return self._conv_forward(input, self.weight, self.bias)
        return self._cpu_forward(input)

    @torch.jit.unused
    def _cpu_forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        input = input.contiguous(memory_format=torch.channels_last)
        if not torch.is_autocast_enabled("cpu") or self.weight.dtype != torch.float32:
            return super().forward(input)  # weights stored in bf16 (inference): the layers after expect bf16
        with torch.autocast("cpu", enabled=False):
            return super().forward(input.float())


def use_cpu_depthwise_convs(module: nn.Module) -> int:
    """Turn every depthwise ``nn.Conv2d`` of ``module`` into a :class:`CPUDepthwiseConv2d`, in place.

    The modules keep their parameters and names (the state dict is unchanged). Returns how many were changed.
    """
    changed = 0
    for child in module.modules():
        if type(child) is nn.Conv2d and child.groups > 1 and child.groups == child.in_channels == child.out_channels:
            child.__class__ = CPUDepthwiseConv2d
            changed += 1
    return changed


class TimmImageEncoder(nn.Module):
    """A timm backbone returning one feature map per stage, finest first.

    The default ``convnext_tiny`` gives 4 stages with strides 4/8/16/32 and 96/192/384/768 channels, i.e.
    56/28/14/7 pixels at a 224 input. ResNets and EfficientNets give 5 levels, the first at stride 2;
    ``out_indices=4`` keeps their four coarsest (strides 4-32, as ConvNeXt's).

    Args:
        name: timm model name (any model that supports ``features_only=True``).
        in_channels: image channels; 1 for CT or X-ray, 3 for RGB. With pretrained weights timm adapts the stem
            (summing the RGB filters for one channel).
        pretrained: load timm's pretrained weights (from the hub or timm's local cache). A bare name loads timm's
            default tag: for ``convnext_tiny`` (timm 1.0) that is ``convnext_tiny.in12k_ft_in1k`` (ImageNet-12k
            pre-training, ImageNet-1k fine-tuning), NOT the official HiMix code's ``facebook/convnext-tiny-224``,
            which is timm's ``convnext_tiny.fb_in1k``: pass ``name="convnext_tiny.fb_in1k"`` for the official
            weights. The bare name is kept (the project's default) because the architecture and the state dict
            are the same and the choice of weights is the user's; which pre-training fine-tunes better here is
            not measured.
        checkpoint_path: a local weights file (``.pth``/``.bin``/``.safetensors``) for the backbone, loaded
            through timm's own checkpoint filter, so an ImageNet ConvNeXt checkpoint works offline.
        fast_depthwise_convs: run the backbone's depthwise convolutions as :class:`CPUDepthwiseConv2d` (same
            results; faster on the CPU, unchanged on CUDA).
        gradient_checkpointing: recompute the backbone's activations in the backward pass instead of keeping them:
            less training memory, a slower step. Block by block where the backbone's stages have timm's
            ``grad_checkpointing`` flag (ConvNeXt: every stage but the coarsest, one block's activations
            recomputed at a time); otherwise timm's feature wrapper (``set_grad_checkpointing``: whole stages, the
            first and the last not). Same results and gradients either way.
        out_indices: the feature levels returned, passed to timm: an ``int`` ``n`` for the ``n`` coarsest levels,
            a sequence of level indices (negative ones count from the coarsest), or ``None`` (default) for every
            level timm's ``features_only`` model gives. The weights and their names do not depend on it.

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
        fast_depthwise_convs: bool = True,
        gradient_checkpointing: bool = False,
        out_indices: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        kwargs: dict = {"features_only": True, "in_chans": in_channels}
        if isinstance(out_indices, int) and out_indices < 1:
            raise ValueError(f"out_indices as a number of levels must be at least 1, got {out_indices}.")
        if out_indices is not None:
            kwargs["out_indices"] = out_indices if isinstance(out_indices, int) else tuple(int(i) for i in out_indices)
        if checkpoint_path is not None:
            if not os.path.isfile(checkpoint_path):
                raise FileNotFoundError(f"image encoder checkpoint not found: {checkpoint_path}")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.fspath(checkpoint_path)})
        else:
            kwargs["pretrained"] = pretrained
        try:
            self.backbone = timm.create_model(name, **kwargs)
        except IndexError as error:  # timm's own message for a level it does not have: "list index out of range"
            if out_indices is None:
                raise
            levels = len(timm.create_model(name, features_only=True, pretrained=False).feature_info)
            raise ValueError(
                f"image encoder {name!r} has {levels} feature levels (indices 0..{levels - 1}); "
                f"out_indices={out_indices!r} asks for others."
            ) from error
        if fast_depthwise_convs:
            use_cpu_depthwise_convs(self.backbone)
        if gradient_checkpointing:
            self.set_gradient_checkpointing(True)
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        self.reductions: list[int] = list(self.backbone.feature_info.reduction())

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the backbone recomputes activations in the backward pass (:meth:`set_gradient_checkpointing`)."""
        return any(getattr(m, "grad_checkpointing", False) for m in self.backbone.modules())

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass (see ``gradient_checkpointing`` of the class).

        Per block, through the ``grad_checkpointing`` flag of timm's stages (ConvNeXt, ...), in every stage but the
        coarsest, rather than timm's ``features_only`` wrapper, which checkpoints whole stages. Measured on the bf16
        training step at batch 8, 224x224 (``benchmarks/README.md``): per block peaks ~110 MB lower than per stage
        (one block's activations are alive during the recomputation instead of a stage's); the coarsest stage
        would save only 11 MB more (1/64 of the finest stage's pixels per block) for a sixth more recomputation.
        """
        stages = [m for m in self.backbone.modules() if m is not self.backbone and hasattr(m, "grad_checkpointing")]
        for index, stage in enumerate(stages):
            stage.grad_checkpointing = enable and (index < len(stages) - 1 or len(stages) == 1)
        self.backbone.set_grad_checkpointing(enable and not stages)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(image))
