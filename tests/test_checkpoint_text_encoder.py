"""model.pt without the frozen text encoder: its fingerprint instead, checked on every load (issue 11, part 6)."""

from __future__ import annotations

import pytest
import torch

from himix_monai.checkpoints import CheckpointMismatchError, load_network_weights
from himix_monai.handlers import SafeCheckpointLoader
from himix_monai.networks import HiMix
from himix_monai.networks.blocks import FrozenTextEncoder, TextEncoderMismatchError, text_encoder_fingerprint

TINY = dict(in_channels=1, image_encoder="test_convnext", num_heads=4, text_tokens=(6, 4, 3), text_length=8)


def tiny_himix(text_encoder, seed: int = 0, **kwargs) -> HiMix:
    torch.manual_seed(seed)
    return HiMix(text_encoder=text_encoder, **{**TINY, **kwargs})


@pytest.fixture
def other_text_model_dir(tmp_path, tiny_text_model_dir):
    """Another tiny BERT of the same architecture (other random weights)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    directory = tmp_path / "other_bert"
    BertModel(BertConfig.from_pretrained(tiny_text_model_dir)).save_pretrained(directory)
    return str(directory)


def test_state_dict_holds_the_fingerprint_not_the_encoder(tmp_path, tiny_text_model_dir):
    """Fails if the encoder's weights are in the state dict, or the fingerprint depends on the storage dtype, or a
    model.pt does not load strictly (weights_only=True) into networks whose encoder is stored in bf16 / fp16."""
    net = tiny_himix(tiny_text_model_dir)
    state = net.state_dict()
    assert not any(k.startswith("text_encoder.model.") for k in state)
    fingerprint = state["text_encoder._extra_state"]
    assert fingerprint.dtype == torch.uint8 and fingerprint.shape == (256,)
    assert FrozenTextEncoder.decode_fingerprint(fingerprint) == net.text_encoder.fingerprint
    assert net.text_encoder.fingerprint["text_encoder"] == tiny_text_model_dir
    torch.save(state, tmp_path / "model.pt")
    for dtype in ("bf16", "fp16"):
        other = tiny_himix(tiny_text_model_dir, seed=5, text_encoder_dtype=dtype)
        assert other.text_encoder.model.dtype != torch.float32
        assert other.text_encoder.fingerprint == net.text_encoder.fingerprint, dtype  # re-read from the files
        assert text_encoder_fingerprint(other.text_encoder.model, tiny_text_model_dir) == net.text_encoder.fingerprint[
            "sha256"
        ]
        other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
        assert torch.equal(other.head.conv.conv.weight, net.head.conv.conv.weight)
    # an instance is fingerprinted before it is cast; moving the whole network to bf16 keeps the fingerprint
    moved = tiny_himix(tiny_text_model_dir).to(dtype=torch.bfloat16)
    assert moved.text_encoder.model.dtype == torch.bfloat16
    assert torch.equal(moved.state_dict()["text_encoder._extra_state"], fingerprint)


def test_weights_of_another_text_encoder_are_refused_before_anything_is_loaded(
    tmp_path, tiny_text_model_dir, other_text_model_dir
):
    """Fails if weights trained with another encoder load, if the message does not name both encoders and what
    to do, or if the refused load changed a weight; through load_state_dict, MONAI's copy_model_state (used by
    monai.bundle.load) and the bundle's loaders."""
    from monai.networks.utils import copy_model_state

    trained = tiny_himix(other_text_model_dir, seed=3)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    net = tiny_himix(tiny_text_model_dir)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TextEncoderMismatchError) as info:
        net.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    message = str(info.value)
    assert other_text_model_dir in message and tiny_text_model_dir in message and "text_encoder" in message
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing was changed
    with pytest.raises(TextEncoderMismatchError):
        copy_model_state(net, trained.state_dict())
    with pytest.raises(CheckpointMismatchError, match="other_bert"):
        load_network_weights(net, tmp_path / "model.pt")
    from ignite.engine import Engine

    with pytest.raises(CheckpointMismatchError, match="other_bert"):
        SafeCheckpointLoader(load_path=str(tmp_path / "model.pt"), load_dict={"model": net})(Engine(lambda e, b: None))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_old_checkpoints_with_the_encoder_weights_still_load(tmp_path, tiny_text_model_dir, other_text_model_dir):
    """Fails if a model.pt written before the encoder was left out (``text_encoder.model.*`` keys, no fingerprint)
    no longer loads strictly, or if such a file with another encoder's weights is accepted."""
    from monai.handlers import CheckpointLoader

    trained = tiny_himix(tiny_text_model_dir, seed=3, text_encoder_dtype="bf16")  # old files kept the used dtype
    old = {k: v for k, v in trained.state_dict().items() if k != "text_encoder._extra_state"}
    old.update({f"text_encoder.model.{k}": v for k, v in trained.text_encoder.model.state_dict().items()})
    torch.save(old, tmp_path / "old.pt")
    net = tiny_himix(tiny_text_model_dir)
    net.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True), strict=True)
    assert torch.equal(net.head.conv.conv.weight, trained.head.conv.conv.weight)
    load_network_weights(tiny_himix(tiny_text_model_dir), tmp_path / "old.pt")
    from ignite.engine import Engine

    CheckpointLoader(load_path=str(tmp_path / "old.pt"), load_dict={"model": net})(Engine(lambda e, b: None))

    with pytest.raises(CheckpointMismatchError, match="differs from this network's text encoder"):
        load_network_weights(tiny_himix(other_text_model_dir), tmp_path / "old.pt")


def test_training_states_of_the_previous_format_resume(tmp_path, tiny_text_model_dir, other_text_model_dir):
    """Fails if a training state of the previous format (encoder left out, a sum-of-absolute-values checksum in
    ``meta["frozen_weights"]``) no longer loads, or loads into a network with another encoder."""
    trained = tiny_himix(tiny_text_model_dir, seed=3)
    network = {k: v for k, v in trained.state_dict().items() if k != "text_encoder._extra_state"}
    checksum = float(sum(p.double().abs().sum() for p in trained.text_encoder.model.parameters()))
    keys = [f"text_encoder.model.{k}" for k, _ in trained.text_encoder.model.named_parameters()]
    state = {"network": network, "meta": {"frozen_weights": {"keys": keys, "fingerprint": checksum}}}
    torch.save(state, tmp_path / "checkpoint_latest.pt")
    net = tiny_himix(tiny_text_model_dir, text_encoder_dtype="bf16")
    load_network_weights(net, tmp_path / "checkpoint_latest.pt")
    assert torch.equal(net.head.conv.conv.weight, trained.head.conv.conv.weight)
    with pytest.raises(CheckpointMismatchError, match="another text encoder"):
        load_network_weights(tiny_himix(other_text_model_dir), tmp_path / "checkpoint_latest.pt")
