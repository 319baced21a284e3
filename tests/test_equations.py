"""One test per equation of HiMix (paper Eqs. 1-9): the project's block against a reference built anew.

Every reference below is written from its definition with plain torch operations, never by calling the
project's code: the paper's formula where the project follows the paper, and the official code's computation
(``utils/layers_himix.py`` of JaeyoonSSim/HiMix, re-written from reading it) where an option reproduces the
official code. The project's block and the reference share the same weights. Tiny sizes, CPU, eval mode.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import SubpixelUpsample, UnetOutBlock

from himix_monai.networks.blocks import (
    AdaptiveSpectrumRefinement,
    DynamicLayerFusion,
    TextProjection,
    VisualTextualMixingStage,
)
from himix_monai.networks.blocks.head import subpixel_segmentation_head

ATOL = 1e-5


# ----------------------------------------------------------------------------------------------------------- Eq. 1
@pytest.mark.parametrize("num_layers", [12, 10, 6])
def test_eq1_dlfm_groups_and_weights(num_layers):
    """``J_m = [ceil(N/M (m-1) + 1), ceil(N/M m)]``, ``t_m = sum_j softmax(alpha_m)_j p_j``, ``G_M`` first."""
    num_stages = 3
    torch.manual_seed(0)
    fusion = DynamicLayerFusion(num_layers, num_stages)
    with torch.no_grad():
        for alpha in fusion.logits:
            alpha.copy_(torch.randn_like(alpha))
    hidden = [torch.randn(2, 5, 8) for _ in range(num_layers + 1)]  # embedding output + N layers

    ratio = Fraction(num_layers, num_stages)
    expected_groups = [
        list(range(math.ceil(ratio * (m - 1) + 1), math.ceil(ratio * m) + 1)) for m in range(1, num_stages + 1)
    ]
    assert fusion.groups == expected_groups
    assert sorted(j for g in expected_groups for j in g) == list(range(1, num_layers + 1))  # no layer 0

    reference = []
    for m, layers in enumerate(expected_groups):
        weights = torch.exp(fusion.logits[m].detach())
        weights = weights / weights.sum()
        reference.append(sum(w * hidden[j] for w, j in zip(weights, layers)))
    outputs = fusion(hidden)
    for stage, group in enumerate(range(num_stages, 0, -1)):  # the first (coarsest) stage gets G_M
        torch.testing.assert_close(outputs[stage], reference[group - 1], atol=ATOL, rtol=0)


def test_eq1_init_is_the_plain_mean():
    """The logits start equal (supplement: initialised to ones), so each ``t_m`` starts as its group's mean."""
    fusion = DynamicLayerFusion(12, 3)
    hidden = [torch.randn(1, 4, 6) for _ in range(13)]
    torch.testing.assert_close(fusion(hidden)[0], torch.stack(hidden[9:13]).mean(0), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------- Eq. 2
def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3 + (parameter == 1.0) * 1.0)


def test_eq2_paper_order():
    """``t_hat = ReLU(Conv(t W_t))``: Linear over the width, 1x1 Conv over the token axis, ReLU."""
    projection = TextProjection(text_width=12, stage_width=8, text_length=6, num_tokens=4)
    _randomise(projection)
    text = torch.randn(3, 6, 12)
    w_t, b_t = projection.width_projection.weight, projection.width_projection.bias
    w_c, b_c = projection.token_projection.weight[:, :, 0], projection.token_projection.bias  # (L', L)
    widened = torch.einsum("blp,cp->blc", text, w_t) + b_t
    reference = torch.relu(torch.einsum("kl,blc->bkc", w_c, widened) + b_c[None, :, None])
    torch.testing.assert_close(projection(text), reference, atol=ATOL, rtol=0)


def test_eq2_official_order():
    """Official ``text_project``: Conv1d over tokens, GELU, Linear, LeakyReLU (slope 0.01)."""
    projection = TextProjection(12, 8, 6, 4, order="official")
    _randomise(projection)
    text = torch.randn(3, 6, 12)
    w_t, b_t = projection.width_projection.weight, projection.width_projection.bias
    w_c, b_c = projection.token_projection.weight[:, :, 0], projection.token_projection.bias
    mixed = torch.einsum("kl,blp->bkp", w_c, text) + b_c[None, :, None]
    gelu = 0.5 * mixed * (1.0 + torch.erf(mixed / math.sqrt(2.0)))
    widened = torch.einsum("bkp,cp->bkc", gelu, w_t) + b_t
    reference = torch.where(widened >= 0, widened, 0.01 * widened)
    torch.testing.assert_close(projection(text), reference, atol=ATOL, rtol=0)
    # the two orders share their parameters: a state dict moves between them
    TextProjection(12, 8, 6, 4).load_state_dict(projection.state_dict())
    with pytest.raises(ValueError, match="order"):
        TextProjection(12, 8, 6, 4, order="gelu-first")


# ----------------------------------------------------------------------------------------------------------- Eq. 3
def official_asrm(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official ``LFM.forward``: ``x + Re(IFFT(FFT(x) * (1 - G)))``, ``G`` centred on index ``(H//2, W//2)``."""
    height, width = x.shape[-2:]
    yv, xv = torch.meshgrid(torch.arange(height).double(), torch.arange(width).double(), indexing="ij")
    gauss = torch.exp(-((yv - height // 2) ** 2 + (xv - width // 2) ** 2) / (2 * sigma**2))
    spectrum = torch.fft.fft2(x.double()) * (1 - gauss)
    return (x.double() + torch.fft.ifft2(spectrum, s=(height, width)).real).float()


def symmetric_asrm(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 3 with the project's filter: distance of the signed frequency's magnitude from ``(H/2, W/2)``."""
    height, width = x.shape[-2:]
    fy = (torch.fft.fftfreq(height, dtype=torch.float64) * height).abs()
    fx = (torch.fft.fftfreq(width, dtype=torch.float64) * width).abs()
    radius_sq = (height / 2 - fy)[:, None] ** 2 + (width / 2 - fx)[None, :] ** 2
    g = 1 - torch.exp(-radius_sq / (2 * sigma**2))
    return (x.double() + torch.fft.ifft2(torch.fft.fft2(x.double()) * g).real).float()


def _asrm(sigma: float) -> AdaptiveSpectrumRefinement:
    return AdaptiveSpectrumRefinement(sigma_init=sigma)


@pytest.mark.parametrize("size", [(8, 8), (14, 14), (6, 10), (4, 4)])
@pytest.mark.parametrize("sigma", [0.7, 2.3, 5.0])
def test_eq3_asrm_equals_the_official_filter_at_even_sizes(size, sigma):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(_asrm(sigma)(x), official_asrm(x, sigma), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sigma", [0.7, 2.3, 5.0])
def test_eq3_asrm_at_the_odd_7x7_stage_is_the_documented_symmetric_fix(sigma):
    """At 7x7 the official filter peaks at frequency +3 only (not symmetric in k -> -k); the project's does not.

    Documented in ``gaussian_spectrum_filter``: the official result equals filtering with the average of its
    filter and the mirror image, and the project's filter uses the real-valued centre 3.5 instead.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        project = _asrm(sigma)(x)
    official = official_asrm(x, sigma)
    torch.testing.assert_close(project, symmetric_asrm(x, sigma), atol=1e-4, rtol=0)
    assert (project - official).abs().max() > 1e-3  # they differ: a deliberate fix

    # why: the official filter is not symmetric, and its real part is the symmetrised filter's result
    idx = torch.arange(7).double()
    gauss = torch.exp(-((idx[:, None] - 3) ** 2 + (idx[None, :] - 3) ** 2) / (2 * sigma**2))
    mirrored = torch.roll(torch.flip(gauss, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))  # G(-k)
    assert not torch.allclose(gauss, mirrored)
    symmetrised = 1 - (gauss + mirrored) / 2
    via_average = x.double() + torch.fft.ifft2(torch.fft.fft2(x.double()) * symmetrised).real
    torch.testing.assert_close(official, via_average.float(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------- Eqs. 4-8
C, C_SKIP, C_OUT, HEADS, C_P, L, L_OUT, SIZE = 16, 8, 8, 4, 12, 6, 4, 4


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _attention(query, key, value, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, heads):
    """Multi-head attention from its definition: per head ``softmax(q k^T / sqrt(d)) v``, concat, out proj."""

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # (B, h, N, d)

    q, k, v = split(query @ w_q.T + b_q), split(key @ w_k.T + b_k), split(value @ w_v.T + b_v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
    return out @ w_o.T + b_o


def _cross_weights(stage):
    ca = stage.cross_attention
    return (ca.to_q.weight, ca.to_q.bias, ca.to_k.weight, ca.to_k.bias, ca.to_v.weight, ca.to_v.bias,
            ca.out_proj.weight, ca.out_proj.bias)  # fmt: skip


def _self_weights(stage):
    sa = stage.self_attention
    w, b = sa.qkv.weight, sa.qkv.bias  # rows: all of q, then all of k, then all of v
    return (w[:C], b[:C], w[C : 2 * C], b[C : 2 * C], w[2 * C :], b[2 * C :], sa.out_proj.weight, sa.out_proj.bias)


def _position_2d(height, width, channels):
    """Fixed 2-D sine/cosine codes: a quarter of the channels sin(row), cos(row), sin(col), cos(col) each."""
    quarter = channels // 4
    freqs = [10000.0 ** (-i / quarter) for i in range(quarter)]
    codes = torch.zeros(height, width, channels)
    for r in range(height):
        for c in range(width):
            codes[r, c] = torch.tensor(
                [math.sin(r * f) for f in freqs]
                + [math.cos(r * f) for f in freqs]
                + [math.sin(c * f) for f in freqs]
                + [math.cos(c * f) for f in freqs]
            )
    return codes.reshape(height * width, channels)


def _up_block(stage, tokens, skip):
    """Eqs. 7-8 as MONAI ``UnetrUpBlock`` computes them: transposed conv 2x2/2, concat the skip, then twice
    conv 3x3 - BatchNorm (running statistics in eval) - LeakyReLU(0.01)."""
    up = stage.up
    batch = tokens.shape[0]
    d = tokens.transpose(1, 2).reshape(batch, C, SIZE, SIZE)  # Reshape
    d_u = F.conv_transpose2d(d, up.transp_conv.conv.weight, stride=2)  # Upsample (Eq. 7)
    out = torch.cat([d_u, skip], dim=1)
    block = up.conv_block
    for conv, norm in ((block.conv1.conv, block.norm1), (block.conv2.conv, block.norm2)):
        out = F.conv2d(out, conv.weight, padding=1)
        out = (out - norm.running_mean[None, :, None, None]) / torch.sqrt(norm.running_var + norm.eps)[
            None, :, None, None
        ] * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
        out = torch.where(out >= 0, out, 0.01 * out)
    return out


def _make_stage(**kwargs) -> VisualTextualMixingStage:
    torch.manual_seed(0)
    stage = VisualTextualMixingStage(C, C_SKIP, C_OUT, C_P, L, L_OUT, num_heads=HEADS, sigma_init=1.7, **kwargs)
    _randomise(stage, seed=1)  # every weight, LayerNorm affine, beta and sigma random
    with torch.no_grad():
        stage.asrm.sigma.fill_(1.7)
        for norm in (stage.up.conv_block.norm1, stage.up.conv_block.norm2):
            norm.running_mean.copy_(torch.randn(C_OUT) * 0.2)
            norm.running_var.copy_(torch.rand(C_OUT) + 0.5)
    return stage.eval()


def _inputs():
    torch.manual_seed(2)
    return torch.randn(2, C, SIZE, SIZE), torch.randn(2, C_SKIP, 2 * SIZE, 2 * SIZE), torch.randn(2, L, C_P)


def test_eqs4_to_8_project_stage_against_its_formulas():
    """The default stage: Eq. 3, Eq. 2 (paper order), Eqs. 4-6 with pre-LN, 2-D codes on the attention inputs
    and the documented extra LayerNorm before the MLP, then Eqs. 7-8."""
    stage = _make_stage()
    d, skip, text = _inputs()
    with torch.no_grad():
        d_hat = symmetric_asrm(d, 1.7)  # Eq. 3 (4x4: equal to the official filter too)
        tokens = d_hat.flatten(2).transpose(1, 2)
        pos = _position_2d(SIZE, SIZE, C)
        tp = stage.text_projection
        t_hat = torch.relu(
            torch.einsum("kl,blc->bkc", tp.token_projection.weight[:, :, 0], text @ tp.width_projection.weight.T
                         + tp.width_projection.bias) + tp.token_projection.bias[None, :, None]
        )  # fmt: skip  (Eq. 2)
        query = _layer_norm(tokens, stage.cross_attention_norm) + pos
        ca = _attention(query, t_hat, t_hat, *_cross_weights(stage), HEADS)
        d_ca = tokens + stage.beta_cross_attention * _layer_norm(ca, stage.cross_attention_out_norm)  # Eq. 4
        a = _layer_norm(d_ca, stage.self_attention_norm) + pos  # codes enter q, k and v (documented)
        sa = _attention(a, a, a, *_self_weights(stage), HEADS)
        d_sa = d_ca + stage.beta_self_attention * _layer_norm(sa, stage.self_attention_out_norm)  # Eq. 5
        mlp = stage.mlp
        hidden = torch.relu(_layer_norm(d_sa, stage.mlp_norm) @ mlp.linear1.weight.T + mlp.linear1.bias)
        d_m = d_sa + stage.beta_mlp * (hidden @ mlp.linear2.weight.T + mlp.linear2.bias)  # Eq. 6 (+ LN)
        reference = _up_block(stage, d_m, skip)  # Eqs. 7-8
        torch.testing.assert_close(stage(d, skip, text), reference, atol=1e-4, rtol=0)


def _official_positional_encoding(length, d_model):
    """The official ``PositionalEncoding`` table (dropout 0): ``pe[n, 2i] = sin(n * exp(-2i ln(10000) / d))``,
    ``pe[n, 2i + 1] = cos(n * exp(-2i ln(10000) / d))``."""
    pe = torch.zeros(length, d_model)
    for n in range(length):
        for i in range(0, d_model, 2):
            angle = n * math.exp(i * -(math.log(10000.0) / d_model))
            pe[n, i] = math.sin(angle)
            pe[n, i + 1] = math.cos(angle)
    return pe


@pytest.mark.parametrize("codes", [False, True], ids=["no_codes", "official_1d_codes"])
def test_eqs4_to_8_official_options_against_the_official_decoder_layer(codes):
    """``mlp_norm=False, mlp_output_dropout=False, text_projection_order="official"`` and
    ``position_encoding="official_1d"`` against the official ``DecoderLayer`` + ``UnetrUpBlock`` (re-written):
    ``vis_pos`` on the queries and keys of both attentions (not on the values), ``txt_pos`` on the text keys.
    Without codes (``position_embedding=False``) both sides drop ``vis_pos`` / ``txt_pos``."""
    stage = _make_stage(
        mlp_norm=False,
        mlp_output_dropout=False,
        text_projection_order="official",
        position_embedding=codes,
        position_encoding="official_1d",
    )
    assert isinstance(stage.mlp_norm, torch.nn.Identity) and isinstance(stage.mlp.drop2, torch.nn.Identity)
    d, skip, text = _inputs()
    vis_pos = _official_positional_encoding(SIZE * SIZE, C) if codes else torch.zeros(SIZE * SIZE, C)
    txt_pos = _official_positional_encoding(L_OUT, C) if codes else torch.zeros(L_OUT, C)
    with torch.no_grad():
        tp = stage.text_projection
        txt = torch.einsum("kl,blp->bkp", tp.token_projection.weight[:, :, 0], text) + tp.token_projection.bias[
            None, :, None
        ]
        txt = F.leaky_relu(F.gelu(txt) @ tp.width_projection.weight.T + tp.width_projection.bias)  # text_project
        x = official_asrm(d, 1.7).flatten(2).transpose(1, 2)  # lfm
        vis1 = _layer_norm(x, stage.cross_attention_norm)  # norm2
        vis1 = _attention(vis1 + vis_pos, txt + txt_pos, txt, *_cross_weights(stage), HEADS)  # cross_attn
        vis1 = x + stage.beta_cross_attention * _layer_norm(vis1, stage.cross_attention_out_norm)  # scale1
        vis2 = _layer_norm(vis1, stage.self_attention_norm)  # norm1
        vis2 = _attention(vis2 + vis_pos, vis2 + vis_pos, vis2, *_self_weights(stage), HEADS)  # self_attn
        vis2 = vis1 + stage.beta_self_attention * _layer_norm(vis2, stage.self_attention_out_norm)  # scale2
        mlp = stage.mlp
        out = torch.relu(vis2 @ mlp.linear1.weight.T + mlp.linear1.bias) @ mlp.linear2.weight.T + mlp.linear2.bias
        out = vis2 + stage.beta_mlp * out  # scale3 (dropout is the identity in eval)
        reference = _up_block(stage, out, skip)  # Decoder: UnetrUpBlock(2, C, C_out, 3, 2, "BATCH")
        torch.testing.assert_close(stage(d, skip, text), reference, atol=1e-4, rtol=0)
        # and the default stage is a different function (the documented LayerNorm before the MLP)
        default = _make_stage(text_projection_order="official", position_embedding=False)
        assert (default(d, skip, text) - reference).abs().max() > 1e-3
        if codes:  # the codes matter: the same weights with the project's 2-D codes give another function
            two_d = _make_stage(mlp_norm=False, mlp_output_dropout=False, text_projection_order="official")
            two_d.load_state_dict(stage.state_dict())  # one state dict for both encodings
            assert (two_d(d, skip, text) - reference).abs().max() > 1e-3


def test_official_1d_codes_respect_rows_without_a_report():
    """With ``position_encoding="official_1d"`` a row without a report (``text_present`` False) still gets the
    image-only result, as in the default mode."""
    stage = _make_stage(position_encoding="official_1d")
    d, skip, text = _inputs()
    with torch.no_grad():
        mixed = stage(d, skip, text, torch.tensor([True, False]))
        torch.testing.assert_close(mixed[1:], stage(d[1:], skip[1:], None), atol=1e-4, rtol=0)
        torch.testing.assert_close(mixed[:1], stage(d[:1], skip[:1], text[:1]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="position_encoding"):
        _make_stage(position_encoding="learned")


def test_eq6_mlp_dropout_options_in_training():
    """Official MLP: one dropout after the activation; the default keeps MONAI's second one after the output."""
    for output_dropout, expected in ((True, 2), (False, 1)):
        stage = _make_stage(mlp_output_dropout=output_dropout)
        dropouts = [m for m in stage.mlp.modules() if isinstance(m, torch.nn.Dropout)]
        assert len(dropouts) == expected and all(m.p == 0.1 for m in dropouts)


# ----------------------------------------------------------------------------------------------------------- Eq. 9
def test_eq9_head_against_its_definition():
    """``S = Sigmoid(Conv(Upsample(d_1^o)))``: subpixel upsampling (3x3 conv to C r^2, pixel shuffle, zero-pad +
    r x r average blur, MONAI ``SubpixelUpsample``) then a 1x1 conv; the network returns the logits."""
    torch.manual_seed(0)
    upsample, head = SubpixelUpsample(2, 8, 4, scale_factor=4), UnetOutBlock(2, 4, 1)
    _randomise(upsample, 3)
    _randomise(head, 4)
    features = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        conv = upsample.conv_block
        up = F.conv2d(features, conv.weight, conv.bias, padding=1)  # (B, 4 * 16, H, W)
        up = F.pixel_shuffle(up, 4)  # (B, 4, 4H, 4W)
        up = F.avg_pool2d(F.pad(up, (3, 0, 3, 0)), kernel_size=4, stride=1)  # blur
        out_conv = head.conv.conv
        logits = F.conv2d(up, out_conv.weight, out_conv.bias)
        result = subpixel_segmentation_head(features, upsample, head)
    assert result.shape == (2, 1, 20, 24)
    torch.testing.assert_close(torch.sigmoid(result), torch.sigmoid(logits), atol=ATOL, rtol=0)
    torch.testing.assert_close(result, logits, atol=1e-4, rtol=0)


def test_himix_passes_the_fidelity_options_to_every_stage(tiny_bert):
    """``HiMix(mlp_norm=..., mlp_output_dropout=..., text_projection_order=...)`` reaches every mixing stage."""
    from himix_monai.networks import HiMix

    torch.manual_seed(0)
    net = HiMix(in_channels=1, image_encoder="test_convnext", text_encoder=tiny_bert, num_heads=4,
                text_tokens=(6, 4, 3), text_length=8, mlp_norm=False, mlp_output_dropout=False,
                text_projection_order="official", position_encoding="official_1d")
    for stage in net.stages:
        assert stage.position_encoding == "official_1d"
        assert isinstance(stage.mlp_norm, torch.nn.Identity)
        assert stage.text_projection.order == "official"
        assert sum(isinstance(m, torch.nn.Dropout) for m in stage.mlp.modules()) == 1
    default = HiMix(in_channels=1, image_encoder="test_convnext", text_encoder=tiny_bert, num_heads=4,
                    text_tokens=(6, 4, 3), text_length=8)
    assert all(isinstance(stage.mlp_norm, torch.nn.LayerNorm) for stage in default.stages)
    assert all(stage.position_encoding == "sinusoidal_2d" for stage in default.stages)
