"""One visual-textual mixing stage of the HiMix decoder (paper Sec. 3.3, Eqs. 2-8)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import CrossAttentionBlock, MLPBlock, SABlock, UnetrUpBlock

from himix_monai.networks.blocks.asrm import AdaptiveSpectrumRefinement

__all__ = [
    "POSITION_ENCODINGS",
    "TEXT_PROJECTION_ORDERS",
    "TextProjection",
    "VisualTextualMixingStage",
    "sinusoidal_position_embedding_1d",
    "sinusoidal_position_embedding_2d",
]

TEXT_PROJECTION_ORDERS = ("paper", "official")
POSITION_ENCODINGS = ("sinusoidal_2d", "official_1d")


def sinusoidal_position_embedding_1d(length: int, channels: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 1-D sine/cosine codes of the token index ``(length, C)``, interleaved as in the Transformer paper.

    ``pe[n, 2i] = sin(n / 10000^(2i / C))`` and ``pe[n, 2i + 1] = cos(n / 10000^(2i / C))``: the codes of the
    official HiMix code's ``PositionalEncoding`` (``utils/layers_himix.py``, dropout 0), computed for any length
    (the official table stops at 5000 tokens) and any ``C`` (an odd ``C`` drops the last cosine). Image tokens
    are numbered row by row, so the index of a pixel is ``row * W + column``.

    Examples::

        >>> sinusoidal_position_embedding_1d(49, 96).shape
        torch.Size([49, 96])
    """
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, channels, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / channels)
    )
    angles = position * inv_freq[None]  # (length, ceil(C / 2))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(length, -1)[:, :channels]


def sinusoidal_position_embedding_2d(
    height: int, width: int, channels: int, device: torch.device | None = None
) -> torch.Tensor:
    """Fixed 2-D sine/cosine position embedding ``(H * W, C)``: half the channels encode rows, half columns.

    Without position codes, self-attention over image tokens could not tell "upper left" from "lower right"
    except through padding artefacts. This is a departure from the official HiMix code, which adds 1-D
    sinusoidal codes of the flattened token index (``PositionalEncoding``) to the queries and keys only (also to
    the text keys of the cross-attention); the paper does not mention position codes. The project's 2-D codes
    keep rows and columns apart at any resolution, whereas a 1-D index code places the first pixel of a row
    next to the last pixel of the previous one. Both trained alike in a short screening (see
    :class:`VisualTextualMixingStage`); the stage's
    ``position_encoding="official_1d"`` uses the official codes (:func:`sinusoidal_position_embedding_1d`).
    """
    quarter = channels // 4
    if quarter == 0:
        return torch.zeros(height * width, channels, device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    emb = torch.cat([row_emb, col_emb], dim=-1).reshape(height * width, 4 * quarter)
    if emb.shape[1] < channels:
        emb = nn.functional.pad(emb, (0, channels - emb.shape[1]))
    return emb


def _multi_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """Multi-head attention with separate query, key and value INPUTS, before the output projection.

    MONAI's ``SABlock`` projects one input to queries, keys and values, and ``CrossAttentionBlock`` one context to
    keys and values; the official position codes enter the queries and keys but not the values, so the stage
    computes that case here with the blocks' own weights (``weights``/``biases``: those of q, k, v, in this
    order) through ``scaled_dot_product_attention``, as the MONAI blocks do (their dropout rate is 0). Returns
    ``(B, N_query, C)``, the heads concatenated; the caller applies the block's output projection.
    """
    batch, length = query.shape[0], query.shape[1]
    q = F.linear(query, weights[0], biases[0]).reshape(batch, length, num_heads, -1).transpose(1, 2)
    k = F.linear(key, weights[1], biases[1]).reshape(batch, key.shape[1], num_heads, -1).transpose(1, 2)
    v = F.linear(value, weights[2], biases[2]).reshape(batch, value.shape[1], num_heads, -1).transpose(1, 2)
    attended = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attended.transpose(1, 2).reshape(batch, length, -1)


def _bias(bias: torch.Tensor | None) -> torch.Tensor:
    """A projection's bias (the stage builds its attention with ``qkv_bias=True``)."""
    if bias is None:
        raise RuntimeError("the stage's attention projections are built with biases.")
    return bias


class TextProjection(nn.Module):
    """Align a text embedding with a decoder stage: ``t_hat = ReLU(Conv(t W_t))`` (Eq. 2).

    ``W_t`` maps the text width ``C_P`` to the stage width ``C_i``; the 1x1 convolution runs over the token
    axis (tokens as channels) and maps the ``L`` input tokens to ``L'`` tokens.

    ``order="paper"`` (default) follows Eq. 2: Linear, token Conv, ReLU. ``order="official"`` reproduces the
    official code's ``text_project``: token Conv, GELU, Linear, LeakyReLU. Both orders use the same two
    parameterised layers, so a state dict loads into either. The paper's order is the default because the
    project follows the paper where paper and official code differ; the effect on accuracy is not measured.

    Args:
        text_width: ``C_P``, hidden width of the text encoder.
        stage_width: ``C_i``, channel width of the decoder stage.
        text_length: ``L``, number of input tokens (the tokenizer's ``max_length``).
        num_tokens: ``L'``, number of tokens after projection.
        order: ``"paper"`` or ``"official"``, see above.

    Examples::

        >>> TextProjection(384, 96, 24, 12)(torch.randn(2, 24, 384)).shape
        torch.Size([2, 12, 96])
    """

    def __init__(
        self, text_width: int, stage_width: int, text_length: int, num_tokens: int, order: str = "paper"
    ) -> None:
        super().__init__()
        if order not in TEXT_PROJECTION_ORDERS:
            raise ValueError(f"order must be one of {TEXT_PROJECTION_ORDERS}, got {order!r}.")
        self.order = order
        self.width_projection = nn.Linear(text_width, stage_width)  # W_t
        self.token_projection = nn.Conv1d(text_length, num_tokens, kernel_size=1)  # Conv, over tokens
        self.activation = nn.ReLU()
        # official order only: GELU between the token Conv and the Linear, LeakyReLU at the end
        self.inner_activation = nn.GELU() if order == "official" else nn.Identity()
        if order == "official":
            self.activation = nn.LeakyReLU()

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, L, C_P) -> (B, L', C_i)``."""
        if self.order == "official":
            return self.activation(self.width_projection(self.inner_activation(self.token_projection(text))))
        return self.activation(self.token_projection(self.width_projection(text)))


class VisualTextualMixingStage(nn.Module):
    """One HiMix decoder stage: ASRM, text cross-attention, self-attention, MLP, then upsample and fuse the skip.

    For the stage input ``d`` (the previous stage's output, or the deepest image feature) and the stage's text
    embedding ``t`` from :class:`DynamicLayerFusion`:

    - ``d_hat = ASRM(d)`` (Eq. 3, optional);
    - ``d_ca = d_hat + beta_ca * LN(MHCA(d_hat, t_hat))`` with ``t_hat`` from :class:`TextProjection` (Eqs. 2, 4);
    - ``d_sa = d_ca + beta_sa * LN(MHSA(d_ca))`` (Eq. 5);
    - ``d = d_sa + beta_mlp * MLP(LN(d_sa))`` (Eq. 6 with an extra LayerNorm, see ``mlp_norm``);
    - ``d_o = conv-norm-act([Upsample(d), f_skip])`` (Eqs. 7-8), MONAI's ``UnetrUpBlock`` (two conv-norm-LeakyReLU
      layers, as in the official code; the paper writes one ``ReLU(Conv(.))``).

    Where this differs from the paper and from the official code (``DecoderLayer`` of JaeyoonSSim/HiMix):

    - The attention inputs are layer-normalised first, as in the official code (the paper writes
      ``MHCA(d_hat, t_hat)`` without it); the paper's post-attention LayerNorms (Eqs. 4-5) are kept, as in both.
    - Position codes (``position_encoding``): ``"sinusoidal_2d"`` (default) adds fixed 2-D sinusoidal codes
      (:func:`sinusoidal_position_embedding_2d`) to the normalised image tokens, so in self-attention they enter
      queries, keys AND values, and the text keys get none. ``"official_1d"`` does what the official code does:
      1-D codes of the flattened token index (:func:`sinusoidal_position_embedding_1d`) on the queries and keys
      only (self-attention: ``q = k = LN(d) + p``, ``v = LN(d)``; cross-attention: ``q = LN(d) + p``), and 1-D codes
      of the projected text token index on the text keys (``k = t_hat + p_t``, ``v = t_hat``). The paper has no
      position codes (``position_embedding=False`` removes them). The 2-D default is kept because its codes keep
      rows and columns apart at any resolution, whereas a 1-D index code puts the last pixel of one row next to
      the first of the next. In a 3-epoch Kvasir screening (resnet18 encoder, 96 px, 240 items, one seed) both
      scored the same val Dice (0.557 2-D, 0.554 official; ``benchmarks/results/encoder_screen_2026-12-01.json``);
      not measured at a full budget. Both modes use the same weights (the state dict loads into either).
    - ``mlp_norm=True`` (default) puts a LayerNorm before the MLP of Eq. 6; neither the paper nor the official
      code has it. It is kept as the default because every other residual branch of the stage is
      pre-normalised and the residual scales start at 1.421, so an un-normalised MLP input grows with depth;
      whether it helps is not measured. ``mlp_norm=False`` gives Eq. 6 as written (and as in the official code).
    - ``mlp_output_dropout=True`` (default) keeps MONAI ``MLPBlock``'s second dropout after the output layer
      (its "vit" mode); the official MLP has one dropout, after the activation (``mlp_output_dropout=False``).
      Default kept for continuity with trained checkpoints (dropout has no weights, so both load the same
      state dict); not measured.
    - ``text_projection_order`` selects Eq. 2 as in the paper (default) or the official order, see
      :class:`TextProjection`.

    Each residual scale ``beta`` is a learnable scalar.

    Args:
        in_channels: channels of the stage input ``d`` (also the attention width).
        skip_channels: channels of the encoder skip feature at twice the resolution.
        out_channels: channels of the stage output.
        text_width: hidden width of the text encoder, or ``None`` for an image-only stage (no cross-attention).
        text_length: number of input text tokens ``L``.
        num_text_tokens: number of projected text tokens ``L'``.
        num_heads: attention heads of MHCA and MHSA.
        mlp_ratio: MLP hidden width as a fraction of ``in_channels`` (official code: 0.5).
        dropout_rate: dropout of the MLP.
        residual_scale_init: initial value of every ``beta`` (the official code uses 1.421).
        use_asrm: apply the spectrum refinement (switch off for the ablation).
        sigma_init: initial ASRM bandwidth.
        position_embedding: add position codes to the attention inputs (see above); ``False`` for none (paper).
        position_encoding: ``"sinusoidal_2d"`` (project default) or ``"official_1d"`` (the official code's
            codes), see above.
        norm_name: normalisation of the up block (``"batch"`` as in the official code, ``"instance"`` for tiny
            batches).
        mlp_norm: LayerNorm before the MLP (project default); ``False`` for Eq. 6 and the official code.
        mlp_output_dropout: second dropout after the MLP's output layer (project default); ``False`` for the
            official code's single dropout after the activation.
        text_projection_order: ``"paper"`` (Eq. 2, default) or ``"official"``, see :class:`TextProjection`.

    Examples::

        >>> stage = VisualTextualMixingStage(32, 16, 16, text_width=24, text_length=8, num_text_tokens=4, num_heads=4)
        >>> stage(torch.randn(2, 32, 4, 4), torch.randn(2, 16, 8, 8), torch.randn(2, 8, 24)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        text_width: int | None,
        text_length: int = 24,
        num_text_tokens: int = 24,
        num_heads: int = 8,
        mlp_ratio: float = 0.5,
        dropout_rate: float = 0.1,
        residual_scale_init: float = 1.421,
        use_asrm: bool = True,
        sigma_init: float = 5.0,
        position_embedding: bool = True,
        norm_name: str | tuple = "batch",
        mlp_norm: bool = True,
        mlp_output_dropout: bool = True,
        text_projection_order: str = "paper",
        position_encoding: str = "sinusoidal_2d",
    ) -> None:
        super().__init__()
        if in_channels % num_heads != 0:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by num_heads ({num_heads}).")
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {POSITION_ENCODINGS}, got {position_encoding!r}.")
        self.asrm = AdaptiveSpectrumRefinement(sigma_init) if use_asrm else None
        self.position_embedding = bool(position_embedding)
        self.position_encoding = position_encoding
        self.num_heads = num_heads
        if text_width is not None:
            self.text_projection = TextProjection(
                text_width, in_channels, text_length, num_text_tokens, order=text_projection_order
            )
            self.cross_attention_norm = nn.LayerNorm(in_channels)
            self.cross_attention = CrossAttentionBlock(in_channels, num_heads, qkv_bias=True, use_flash_attention=True)
            self.cross_attention_out_norm = nn.LayerNorm(in_channels)
            self.beta_cross_attention = nn.Parameter(torch.tensor(float(residual_scale_init)))
        else:
            self.text_projection = None
        self.self_attention_norm = nn.LayerNorm(in_channels)
        self.self_attention = SABlock(in_channels, num_heads, qkv_bias=True, use_flash_attention=True)
        self.self_attention_out_norm = nn.LayerNorm(in_channels)
        self.beta_self_attention = nn.Parameter(torch.tensor(float(residual_scale_init)))
        self.mlp_norm: nn.Module = nn.LayerNorm(in_channels) if mlp_norm else nn.Identity()
        self.mlp = MLPBlock(in_channels, max(1, int(in_channels * mlp_ratio)), dropout_rate=dropout_rate, act="RELU")
        if not mlp_output_dropout:
            self.mlp.drop2 = nn.Identity()  # the official MLP: Linear, ReLU, Dropout, Linear
        self.beta_mlp = nn.Parameter(torch.tensor(float(residual_scale_init)))
        self.up = UnetrUpBlock(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=3,
            upsample_kernel_size=2,
            norm_name=norm_name,
        )

    def forward(
        self,
        features: torch.Tensor,
        skip: torch.Tensor,
        text: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            features: stage input ``(B, C_in, H, W)``.
            skip: encoder feature ``(B, C_skip, 2H, 2W)``.
            text: stage text embedding ``(B, L, C_P)`` or ``None`` to skip the cross-attention (Eq. 4).
            text_present: ``(B,)`` booleans, or ``None`` when every row has a report: rows marked ``False`` skip
                the cross-attention (their output is that of ``text=None``).

        Returns:
            ``(B, C_out, 2H, 2W)``.
        """
        if self.asrm is not None:
            features = self.asrm(features)  # Eq. 3
        batch, channels, height, width = features.shape[0], features.shape[1], features.shape[2], features.shape[3]
        tokens = features.flatten(2).transpose(1, 2)  # (B, HW, C)
        official = self.position_embedding and self.position_encoding == "official_1d"
        position: torch.Tensor | None = None
        if self.position_embedding:
            if official:
                position = sinusoidal_position_embedding_1d(height * width, channels, tokens.device)
            else:
                position = sinusoidal_position_embedding_2d(height, width, channels, tokens.device)
            position = position.to(tokens.dtype)
        if text is not None and self.text_projection is not None:
            text_tokens = self.text_projection(text)  # Eq. 2
            query = self.cross_attention_norm(tokens)
            if position is not None:
                query = query + position
            if official:  # codes on the text keys, not on the values
                text_position = sinusoidal_position_embedding_1d(text_tokens.shape[1], channels, tokens.device)
                cross = self.cross_attention
                crossed = _multi_head_attention(
                    query,
                    text_tokens + text_position.to(text_tokens.dtype),
                    text_tokens,
                    [cross.to_q.weight, cross.to_k.weight, cross.to_v.weight],
                    [_bias(cross.to_q.bias), _bias(cross.to_k.bias), _bias(cross.to_v.bias)],
                    self.num_heads,
                    cross.scale,
                )
                crossed = cross.drop_output(cross.out_proj(crossed))
            else:
                crossed = self.cross_attention(query, context=text_tokens)
            attended = self.beta_cross_attention * self.cross_attention_out_norm(crossed)
            if text_present is not None:
                attended = attended * text_present.to(attended.dtype).view(batch, 1, 1)
            tokens = tokens + attended  # Eq. 4
        normed = self.self_attention_norm(tokens)
        if official and position is not None:  # codes on queries and keys only
            attention = self.self_attention
            qkv_weight = attention.qkv.weight
            qkv_bias = _bias(attention.qkv.bias)
            coded = normed + position
            attended_self = _multi_head_attention(
                coded,
                coded,
                normed,
                list(qkv_weight.chunk(3, dim=0)),  # rows: all queries, then all keys, then all values
                list(qkv_bias.chunk(3, dim=0)),
                self.num_heads,
                attention.scale,
            )
            attended_self = attention.drop_output(attention.out_proj(attended_self))
        else:
            if position is not None:
                normed = normed + position
            attended_self = self.self_attention(normed)
        tokens = tokens + self.beta_self_attention * self.self_attention_out_norm(attended_self)  # Eq. 5
        tokens = tokens + self.beta_mlp * self.mlp(self.mlp_norm(tokens))  # Eq. 6 (+ LN when mlp_norm)
        features = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.up(features, skip)  # Eqs. 7-8
