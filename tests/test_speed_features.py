"""The speed features: folded segmentation head, CPU depthwise convolutions, a bf16 frozen text encoder, the compute
dtype of the bundle's ``precision`` switch, gradient checkpointing, and their wiring in the bundle configs.

Every test compares a fast path with the plain computation it replaces (same weights), so a speed feature that
changed the function, the gradients or the stored weights fails here. Tiny sizes throughout: ``test_convnext``
image encoder, the tiny BERT of ``conftest.py``, 64x64 images, batch 2.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from monai.losses import DiceCELoss
from monai.networks.blocks import SubpixelUpsample, UnetOutBlock

from himix_monai.inferers import AutocastInferer, compute_dtype
from himix_monai.networks import HiMix
from himix_monai.networks.blocks import (
    CPUDepthwiseConv2d,
    FrozenTextEncoder,
    TimmImageEncoder,
    load_text_encoder,
    subpixel_segmentation_head,
    use_cpu_depthwise_convs,
)

from tests.test_training_bundle import demo_dir, load_state, read_losses, run_training  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TINY = dict(image_encoder="test_convnext", num_heads=4, text_tokens=(6, 4, 3), text_length=8)


def tiny_himix(text_encoder, seed: int = 0, **kwargs) -> HiMix:
    torch.manual_seed(seed)
    return HiMix(in_channels=1, text_encoder=text_encoder, **{**TINY, **kwargs})


def tokens(batch: int = 2, length: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 30, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[:, length - 2 :] = 0
    return ids, mask


def image(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(2))


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` of the expected tensor's largest magnitude (float32 rounding of reordered sums)."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# ----------------------------------------------------------------------------------------------------------------
# 1. the folded segmentation head


def _random_head(channels: int, out_channels: int, **upsample_kwargs) -> tuple[SubpixelUpsample, UnetOutBlock]:
    torch.manual_seed(3)
    upsample = SubpixelUpsample(2, channels, channels // 4, scale_factor=4, **upsample_kwargs)
    head = UnetOutBlock(2, channels // 4, out_channels)
    with torch.no_grad():  # non-zero biases everywhere (the folded bias and the added bias are both exercised)
        for module in (upsample, head):
            for name, parameter in module.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0.0, 0.5)
    return upsample, head


@pytest.mark.parametrize("apply_pad_pool", [True, False])
@pytest.mark.parametrize("out_channels", [1, 2])
def test_folded_head_equals_unfolded_head_in_value_and_gradients(out_channels: int, apply_pad_pool: bool):
    """Fails if folding the 1x1 convolution into the 3x3 one changes the logits or any gradient (input, both weights,
    both biases), or if the folded path is not taken at all (the 3x3 convolution module would be called)."""
    upsample, head = _random_head(16, out_channels, apply_pad_pool=apply_pad_pool)
    parameters = {
        "up.weight": upsample.conv_block.weight,
        "up.bias": upsample.conv_block.bias,
        "out.weight": head.conv.conv.weight,
        "out.bias": head.conv.conv.bias,
    }
    assert all(p is not None and p.abs().min() > 0 for p in parameters.values() if p.ndim == 1)
    features = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(2, out_channels, 32, 32, generator=torch.Generator().manual_seed(5))

    results = {}
    for name, compute in {
        "folded": lambda x: subpixel_segmentation_head(x, upsample, head),
        "plain": lambda x: head(upsample(x)),
    }.items():
        calls = []
        hook = upsample.conv_block.register_forward_hook(lambda *_: calls.append(1))
        x = features.clone().requires_grad_(True)
        try:
            output = compute(x)
        finally:
            hook.remove()
        gradients = torch.autograd.grad((output * upstream).sum(), [x, *parameters.values()])
        results[name] = (output.detach(), dict(zip(["input", *parameters], gradients)), len(calls))

    folded, folded_grads, folded_calls = results["folded"]
    plain, plain_grads, plain_calls = results["plain"]
    assert (folded_calls, plain_calls) == (0, 1)  # the folded head never runs the C -> C*r^2 convolution
    assert folded.shape == plain.shape == (2, out_channels, 32, 32)
    assert_close_rel(folded, plain)
    for name in plain_grads:
        assert plain_grads[name].abs().max() > 0, name
        assert_close_rel(folded_grads[name], plain_grads[name])


def test_folded_head_under_bf16_autocast_is_as_close_as_the_unfolded_head():
    """Fails if the folded weights (computed under autocast, so rounded to bf16 after the product) lose more than
    bf16 rounding, or the output is not in the autocast dtype as the unfolded head's is."""
    upsample, head = _random_head(32, 1)
    features = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = head(upsample(features))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            folded = subpixel_segmentation_head(features, upsample, head)
            plain = head(upsample(features))
    assert folded.dtype == plain.dtype == torch.bfloat16
    assert relative_error(folded, expected) < max(0.02, 2 * relative_error(plain, expected))  # measured: 4e-3


def test_folded_head_falls_back_when_the_upsampling_block_is_not_one_linear_conv():
    """With a ReLU after the 3x3 convolution, folding would be wrong: fails unless the head computes
    ``head(upsample(x))`` exactly."""
    torch.manual_seed(6)
    conv = nn.Conv2d(16, 4 * 16, 3, padding=1)
    upsample = SubpixelUpsample(2, 16, 4, scale_factor=4, conv_block=nn.Sequential(conv, nn.ReLU()))
    head = UnetOutBlock(2, 4, 2)
    features = torch.randn(2, 16, 8, 8)

    result = subpixel_segmentation_head(features, upsample, head)
    torch.testing.assert_close(result, head(upsample(features)), rtol=0, atol=0)
    # the test can tell: the same weights without the ReLU (what a wrong fold computes) give other logits
    linear = SubpixelUpsample(2, 16, 4, scale_factor=4, conv_block=conv)
    assert not torch.allclose(result, subpixel_segmentation_head(features, linear, head), atol=1e-3)


def test_himix_head_is_the_folded_head(tiny_bert):
    """Fails if HiMix's output stops being ``head(head_upsample(decoded))`` of its own modules."""
    net = tiny_himix(tiny_bert).eval()
    captured = []
    hook = net.stages[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    ids, mask = tokens()
    with torch.no_grad():
        logits = net(image(), ids, mask)
        hook.remove()
        assert_close_rel(logits, net.head(net.head_upsample(captured[0])))


# ----------------------------------------------------------------------------------------------------------------
# 2. CPU depthwise convolutions


def _conv_stack() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 8, 1),  # pointwise
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # grouped, not depthwise
        nn.Conv2d(8, 16, 3, padding=1, groups=8),  # depthwise multiplier 2: out != in
        nn.Sequential(nn.Conv2d(16, 16, 7, padding=3, groups=16, bias=False)),  # depthwise, nested, no bias
        nn.Conv2d(16, 1, 1),
        nn.Conv2d(1, 1, 3, padding=1, groups=1),  # groups == in == out == 1: an ordinary convolution
    )


def test_use_cpu_depthwise_convs_converts_only_depthwise_convs_in_place():
    """Fails if a non-depthwise convolution is converted, a depthwise one is missed, the count is wrong, or the
    state dict (keys or values) changes."""
    module = _conv_stack()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    identities = [id(m) for m in module.modules()]

    assert use_cpu_depthwise_convs(module) == 2
    converted = [name for name, m in module.named_modules() if isinstance(m, CPUDepthwiseConv2d)]
    assert converted == ["0", "4.0"]
    assert [type(module[i]) for i in (1, 2, 3, 5, 6)] == [nn.Conv2d] * 5
    assert [id(m) for m in module.modules()] == identities  # in place: the same module objects
    after = module.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert use_cpu_depthwise_convs(module) == 0  # nothing left to convert


def test_cpu_depthwise_conv_gives_the_plain_conv2d_result():
    """Fails if the channels-last depthwise convolution changes the float32 result, or under bf16 autocast does not
    run in float32 (a plain ``nn.Conv2d`` would return bfloat16)."""
    torch.manual_seed(8)
    plain = nn.Conv2d(12, 12, 7, padding=3, groups=12)
    fast = copy.deepcopy(plain)
    assert use_cpu_depthwise_convs(fast) == 1 and isinstance(fast, CPUDepthwiseConv2d)
    x = torch.randn(2, 12, 16, 16)

    expected = plain(x)
    result = fast(x)
    assert result.dtype == torch.float32 and result.shape == expected.shape
    torch.testing.assert_close(result, expected)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain(x).dtype == torch.bfloat16  # what the conversion avoids
        autocast_result = fast(x)
        from_bf16_input = fast(x.bfloat16())
    assert autocast_result.dtype == torch.float32 and from_bf16_input.dtype == torch.float32
    torch.testing.assert_close(autocast_result, expected)  # computed in float32: as close as without autocast
    torch.testing.assert_close(from_bf16_input, plain(x.bfloat16().float()))

    result.sum().backward()  # gradients reach the (unchanged) parameters
    assert fast.weight.grad is not None and fast.weight.grad.abs().max() > 0


def test_timm_image_encoder_depthwise_switch():
    """Fails if ``fast_depthwise_convs`` no longer controls the conversion, or if the conversion changes the
    encoder's state dict or features."""
    torch.manual_seed(9)
    fast = TimmImageEncoder("test_convnext", in_channels=1)
    torch.manual_seed(9)
    plain = TimmImageEncoder("test_convnext", in_channels=1, fast_depthwise_convs=False)
    assert sum(isinstance(m, CPUDepthwiseConv2d) for m in fast.modules()) > 0
    assert not any(isinstance(m, CPUDepthwiseConv2d) for m in plain.modules())
    assert list(fast.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fast.state_dict())
    x = image()
    with torch.no_grad():
        for a, b in zip(fast(x), plain(x)):
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------------
# 3. the frozen text encoder in bfloat16


def test_frozen_text_encoder_dtype(tiny_bert):
    """Fails if ``dtype="bf16"`` does not store the weights (and return the hidden states) in bfloat16."""
    encoder = FrozenTextEncoder(tiny_bert, dtype="bf16")
    assert {p.dtype for p in encoder.model.parameters()} == {torch.bfloat16}
    ids, mask = tokens()
    hidden = encoder(ids, mask)
    assert len(hidden) == 7 and {h.dtype for h in hidden} == {torch.bfloat16}


@pytest.mark.parametrize("bad", ["fp8", "int8", torch.int64])
def test_invalid_text_encoder_dtype_is_a_value_error(tiny_bert, bad):
    """Fails if an unknown or non-floating dtype is accepted, or the error does not name it."""
    with pytest.raises(ValueError, match=str(bad) if isinstance(bad, torch.dtype) else repr(bad)):
        FrozenTextEncoder(tiny_bert, dtype=bad)
    with pytest.raises(ValueError, match=str(bad) if isinstance(bad, torch.dtype) else repr(bad)):
        tiny_himix(tiny_bert, text_encoder_dtype=bad)


def test_load_text_encoder_casts_an_instance(tiny_bert):
    """Fails if ``load_text_encoder(instance, dtype)`` ignores the dtype, or casts without one."""
    assert load_text_encoder(tiny_bert) is tiny_bert
    assert {p.dtype for p in tiny_bert.parameters()} == {torch.float32}
    model = load_text_encoder(tiny_bert, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_text_encoder_loads_a_directory_in_the_dtype(tiny_text_model_dir):
    """Fails if a model loaded by name or directory is not in the requested dtype."""
    assert {p.dtype for p in load_text_encoder(tiny_text_model_dir).parameters()} == {torch.float32}
    model = load_text_encoder(tiny_text_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_himix_with_a_bf16_text_encoder_matches_the_fp32_network(tiny_text_model_dir):
    """Fails if ``text_encoder_dtype="bf16"`` casts more than the text encoder, changes the network's weights, cannot
    run without autocast or under bf16 autocast, or gives logits far (more than bf16 rounding) from the fp32
    network's."""
    reference = tiny_himix(tiny_text_model_dir, seed=10, dropout_rate=0.0).eval()
    net = tiny_himix(tiny_text_model_dir, seed=10, dropout_rate=0.0, text_encoder_dtype="bf16").eval()
    assert {p.dtype for p in net.text_encoder.model.parameters()} == {torch.bfloat16}
    for name, tensor in net.text_encoder.model.state_dict().items():
        assert torch.equal(tensor, reference.text_encoder.model.state_dict()[name].to(tensor.dtype)), name
    for name, tensor in net.state_dict().items():
        expected = reference.state_dict()[name]
        if name == "text_encoder._extra_state":  # the fingerprint does not depend on the storage dtype
            assert torch.equal(tensor, expected), name
        elif name == "_extra_state":  # the settings record: the same but for the run-time option itself
            from himix_monai.networks import HiMix

            ours, theirs = HiMix.decode_settings(tensor), HiMix.decode_settings(expected)
            assert ours["network"].pop("text_encoder_dtype") == "bf16"
            theirs["network"].pop("text_encoder_dtype")
            assert ours == theirs
        else:
            assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name  # float32 (int counters)
    assert {p.dtype for n, p in net.named_parameters() if not n.startswith("text_encoder.")} == {torch.float32}

    x, (ids, mask) = image(), tokens()
    with torch.no_grad():
        expected = reference(x, ids, mask)
        image_only = reference(x)
        output = net(x, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_output = net(x, ids, mask)
    assert output.dtype == torch.float32 and output.shape == expected.shape == (2, 1, 64, 64)
    assert torch.isfinite(autocast_output).all() and autocast_output.shape == expected.shape
    text_effect = relative_error(image_only, expected)
    assert text_effect > 0.05  # the text matters, so the bounds below are tight enough to notice a broken text path
    assert relative_error(output, expected) < 0.01  # measured: 2e-4 (the text's own effect: 0.1)
    assert relative_error(autocast_output, expected) < 0.02  # measured: 2e-3


# ----------------------------------------------------------------------------------------------------------------
# 4. the compute dtype of the precision switch


def test_compute_dtype():
    """Fails if a precision maps to another dtype than the one the inferer computes in."""
    assert compute_dtype("fp32", "cpu") == torch.float32
    assert compute_dtype("float32") == torch.float32
    assert compute_dtype("bf16", "cpu") == torch.bfloat16
    assert compute_dtype("BF16", torch.device("cpu")) == torch.bfloat16
    assert compute_dtype("fp16", "cpu") == torch.bfloat16  # CPU float16 falls back to bf16
    assert compute_dtype("fp16", "cuda") == torch.float16  # (no GPU needed: only the device type is looked at)
    assert compute_dtype("fp32", "cuda") == torch.float32
    for precision in ("fp32", "bf16", "fp16"):
        inferer = AutocastInferer(precision)
        assert compute_dtype(precision, "cpu") == (inferer.autocast_dtype("cpu") or torch.float32)
    with pytest.raises(ValueError, match="'fp8'"):
        compute_dtype("fp8", "cpu")


# ----------------------------------------------------------------------------------------------------------------
# 5. gradient checkpointing


@pytest.mark.parametrize("with_text", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_bert, with_text: bool):
    """Fails if checkpointing changes the training loss or any parameter gradient, or is not actually done block by
    block in every stage but the coarsest (a block would then run once per step instead of being recomputed in
    the backward pass)."""
    text_encoder = tiny_bert if with_text else None
    plain = tiny_himix(text_encoder, dropout_rate=0.0).train()
    checkpointed = tiny_himix(text_encoder, dropout_rate=0.0, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.image_encoder.gradient_checkpointing
    assert not plain.image_encoder.gradient_checkpointing

    x, (ids, mask) = image(), tokens()
    target = (torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(11)) > 0.5).float()
    loss_function = DiceCELoss(sigmoid=True)
    results = {}
    for name, net in {"plain": plain, "checkpointed": checkpointed}.items():
        calls = []
        backbone = net.image_encoder.backbone
        hooks = [
            stage.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
            for stage in (backbone.stages_0, backbone.stages_1, backbone.stages_2, backbone.stages_3)
        ]
        loss = loss_function(net(x, ids, mask) if with_text else net(x), target)
        loss.backward()
        for hook in hooks:
            hook.remove()
        grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
        results[name] = (loss.detach(), grads, len(calls))

    (loss, grads, calls), (loss_ckpt, grads_ckpt, calls_ckpt) = results["plain"], results["checkpointed"]
    # forward, and with checkpointing once more in the backward pass in every stage but the coarsest
    assert (calls, calls_ckpt) == (4, 7)
    torch.testing.assert_close(loss_ckpt, loss)
    assert list(grads_ckpt) == list(grads)
    assert all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# 6. the bundle wiring


def _bundle_parser(config: str, text_model_dir: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    parser.update(
        {
            "bundle_root": "/nonexistent-bundle-root",  # nothing is read or written: only the network is built
            "device": "$torch.device('cpu')",
            "image_encoder": "test_convnext",
            "network_def#num_heads": 4,
            "text_encoder": text_model_dir,
            **overrides,
        }
    )
    return parser


def test_inference_config_stores_the_network_in_the_compute_dtype(tiny_text_model_dir):
    """Fails if ``precision`` no longer sets the dtype of the inference network's weights, or the bf16 network does
    not run through the bundle's inferer close to the fp32 one with the same weights."""
    networks = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(12)
        net = _bundle_parser("inference.json", tiny_text_model_dir, precision=precision).get_parsed_content("network")
        assert {p.dtype for p in net.parameters()} == {dtype}, precision
        assert {b.dtype for b in net.buffers() if b.is_floating_point()} <= {dtype}, precision
        networks[precision] = net.eval()
    networks["bf16"].load_state_dict(networks["fp32"].state_dict())

    x, (ids, mask) = image(), tokens()
    with torch.no_grad():
        expected = AutocastInferer("fp32")(x, networks["fp32"], ids, mask)
        output = AutocastInferer("bf16")(x, networks["bf16"], ids, mask)
    assert output.dtype == torch.float32 and output.shape == expected.shape == (2, 1, 64, 64)
    assert relative_error(output, expected) < 0.03  # measured: 3e-3 (the text's own effect: 0.1)


@pytest.mark.parametrize("checkpointing", ["true", False, "false"])
def test_train_config_bf16_text_encoder_fused_adamw_and_checkpointing(tiny_text_model_dir, checkpointing):
    """Fails if the training network's text encoder is not stored in bf16 under ``precision: bf16``, anything else is
    not float32, AdamW is not fused, or the ``gradient_checkpointing`` switch (also given as CLI text) does not
    reach the image encoder."""
    parser = _bundle_parser(
        "train.json", tiny_text_model_dir, precision="bf16", gradient_checkpointing=checkpointing
    )
    net = parser.get_parsed_content("network")
    assert {p.dtype for p in net.text_encoder.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in net.named_parameters() if not n.startswith("text_encoder.")} == {torch.float32}
    assert {p.dtype for p in net.image_encoder.parameters()} == {torch.float32}
    assert net.image_encoder.gradient_checkpointing is (checkpointing == "true")

    optimizer = parser.get_parsed_content("optimizer")
    assert optimizer.param_groups[0]["fused"] is True
    trained = optimizer.param_groups[0]["params"]
    assert trained and {p.dtype for p in trained} == {torch.float32}
    assert not any(p is q for p in trained for q in net.text_encoder.model.parameters())
    before = [p.detach().clone() for p in trained]
    for p in trained:
        p.grad = torch.ones_like(p)
    optimizer.step()  # the fused CPU kernel runs
    assert all(not torch.equal(p, b) for p, b in zip(trained, before))


def test_train_config_fp32_keeps_the_text_encoder_in_float32(tiny_text_model_dir):
    """Fails if ``precision: fp32`` stores anything of the training network in a lower precision, or the training
    network is checkpointed by default (it costs 15-25% of the step, issue 18)."""
    net = _bundle_parser("train.json", tiny_text_model_dir, precision="fp32").get_parsed_content("network")
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert not net.image_encoder.gradient_checkpointing


def test_bundle_trains_in_bf16_with_gradient_checkpointing(tmp_path, demo_dir):
    """The training bundle end to end with ``--precision bf16 --gradient_checkpointing true``: a bf16 text encoder,
    fused AdamW on float32 weights, recomputed encoder stages; the losses are finite and fall, model.pt loads."""
    run_training(tmp_path, dataset_dir=demo_dir, epochs=3, precision="bf16", gradient_checkpointing="true")
    losses = [loss for _, _, loss in read_losses(tmp_path / "logs" / "train_loss.csv")]
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    weights = {k: t for k, t in load_state(tmp_path / "models" / "model.pt").items() if t.is_floating_point()}
    # trained weights stay float32; the frozen text encoder is not saved (only its fingerprint)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert not any(k.startswith("text_encoder.model.") for k in weights)


def test_compile_for_inference_gives_the_eager_result(tiny_bert):
    """``HiMix.compile_for_inference`` compiles the image encoder and the decoder stages (not the text encoder, whose
    cache is Python code), keeps the state dict, and the compiled network with frozen weights matches eager."""
    eager = tiny_himix(tiny_bert, text_cache_size=4).eval()
    compiled = copy.deepcopy(eager).compile_for_inference()
    assert compiled.image_encoder._compiled_call_impl is not None
    assert all(stage._compiled_call_impl is not None for stage in compiled.stages)
    assert compiled.text_encoder._compiled_call_impl is None
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    ids, mask = tokens()
    batch = list_data_collate(
        [{"image": MetaTensor(x, meta={"filename_or_obj": f"case{i}.png"})} for i, x in enumerate(image())]
    )["image"]  # a MONAI batch, as the bundle's evaluator passes it
    with torch.inference_mode():
        expected = eager(batch, ids, mask)
        actual = compiled(batch, ids, mask)
    assert_close_rel(actual.as_tensor(), expected.as_tensor(), rel=1e-4)
    assert isinstance(actual, MetaTensor) and actual.is_batch
    assert actual.meta["filename_or_obj"] == expected.meta["filename_or_obj"] == ["case0.png", "case1.png"]


def test_metatensor_batch_runs_as_plain_tensors_and_keeps_its_metadata(tiny_bert):
    """A MONAI batch goes through the network as plain tensors (no per-operation metadata dispatch); the logits equal
    those of the plain batch, keep the graph for training and carry the batch's metadata."""
    net = tiny_himix(tiny_bert).train()
    plain = image()
    batch = list_data_collate(
        [{"image": MetaTensor(x, meta={"filename_or_obj": f"case{i}.png"})} for i, x in enumerate(plain)]
    )["image"]
    ids, mask = tokens()
    torch.manual_seed(3)
    logits = net(batch, ids, mask)
    torch.manual_seed(3)
    expected = net(plain, ids, mask)
    assert isinstance(logits, MetaTensor) and logits.is_batch
    assert logits.meta["filename_or_obj"] == ["case0.png", "case1.png"]
    torch.testing.assert_close(logits.as_tensor(), expected)
    logits.sum().backward()
    assert net.head.conv.conv.weight.grad is not None
