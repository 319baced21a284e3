"""Bundle tooling: verify_net_in_out, TorchScript export round trip, and a 2-process gloo DDP training run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TINY_OVERRIDES = [
    "--image_encoder", "test_convnext",
    "--network_def#num_heads", "4",
    "--demo_num_cases", "24",
    "--batch_size", "4",
    "--image_size", "[64,64]",
]  # fmt: skip


def run_command(args: list[str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_verify_net_in_out_passes_with_the_bundle_metadata():
    result = run_command(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
         "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "train.json"),
         "--image_encoder", "test_convnext", "--network_def#num_heads", "4"]
    )  # fmt: skip
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_torchscript_export_reproduces_the_eager_output(tmp_path, tiny_bert):
    """Fails if the network cannot be scripted (as ``monai.bundle ckpt_export`` does), scripting changes the eager
    network, or the saved module differs from the eager one for another batch size, image size, report, fewer
    tokens than ``text_length`` or no report."""
    from himix_monai.export import example_inputs, export_network
    from himix_monai.networks import HiMix
    from himix_monai.networks.blocks import FrozenTextEncoder

    torch.manual_seed(0)
    net = HiMix(in_channels=1, text_encoder=tiny_bert, image_encoder="test_convnext", num_heads=4, text_length=24)
    net.eval()
    path = tmp_path / "model.ts"
    export_network(net, path, format="torchscript", image_size=(64, 64), extra_files={"metadata.json": "{}"})
    assert isinstance(net.text_encoder, FrozenTextEncoder)  # scripting compiled a copy
    loaded = torch.jit.load(str(path))
    image, input_ids, attention_mask = example_inputs(net, (96, 64), in_channels=1, batch_size=3)
    input_ids[1, :5] = torch.tensor([7, 8, 9, 10, 11])
    with torch.no_grad():
        for args in ((image, input_ids, attention_mask), (image, input_ids[:, :10], attention_mask[:, :10]), (image,)):
            expected, actual = net(*args), loaded(*args)
            assert actual.shape == (3, 1, 96, 64)
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="export format must be one of"):
        export_network(net, tmp_path / "model.tflite", format="tflite")


def test_monai_ckpt_export_scripts_the_bundle_network(tmp_path):
    """The model zoo's TorchScript check: ``python -m monai.bundle ckpt_export network_def`` (torch.jit.script,
    strict loading through ignite) on a model.pt of the inference config, without special code."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"image_encoder": "test_convnext", "network_def#num_heads": 4})
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "model.ts"
    run_command(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(out),
         "--ckpt_file", str(tmp_path / "model.pt"), "--meta_file", str(CONFIGS / "metadata.json"),
         "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(tmp_path),
         "--image_encoder", "test_convnext", "--network_def#num_heads", "4"]
    )  # fmt: skip
    assert torch.jit.load(str(out))(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def export_tiny_bundle_network(tmp_path: Path, *extra: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Save the bundle's network_def (tiny image encoder) and export it with ``python -m himix_monai.export``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"image_encoder": "test_convnext", "network_def#num_heads": 4})
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "model.ts"
    result = run_command(
        [sys.executable, "-m", "himix_monai.export", "--config_file", str(CONFIGS / "train.json"),
         "--ckpt_file", str(tmp_path / "model.pt"), "--filepath", str(out), "--image_size", "64", "64",
         "--image_encoder", "test_convnext", "--network_def#num_heads", "4", *extra]
    )  # fmt: skip
    return out, result


def test_export_command_builds_from_the_bundle_config(tmp_path):
    out, result = export_tiny_bundle_network(
        tmp_path, "--meta_file", str(CONFIGS / "metadata.json"), "--device", "cpu"
    )
    assert out.is_file() and "verified" in result.stdout
    extra = {"metadata.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    metadata = extra["metadata.json"]
    assert '"network_data_format"' in (metadata.decode() if isinstance(metadata, bytes) else metadata)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_on_cuda_runs_on_cuda(tmp_path):
    out, _ = export_tiny_bundle_network(tmp_path, "--device", "cuda:0")
    module = torch.jit.load(str(out), map_location="cuda:0")
    ids = torch.ones(1, 24, dtype=torch.long, device="cuda:0")
    assert module(torch.rand(1, 1, 64, 64, device="cuda:0"), ids, torch.ones_like(ids)).is_cuda


@pytest.mark.slow
def test_two_process_gloo_ddp_training(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    result = run_command(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
         "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
         "--bundle_root", str(tmp_path), "--epochs", "2", *TINY_OVERRIDES]
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert (tmp_path / "models" / "model.pt").is_file()
    assert "terminate called" not in log
    # metrics are logged by rank 0 only: one validation summary per epoch
    assert log.count("Key metric: val_mean_dice best value") == 2
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state), "rank 0 must save the unwrapped network"


def test_inference_config_has_the_training_settings_of_the_network_and_preprocessing():
    """inference.json must stay loadable alone, so it repeats train.json's network and preprocessing settings; fails
    if a default differs (model.pt records the trained settings and inference refuses a mismatch, see
    test_bundle_evaluate_inference.py, but the defaults of the two files must agree)."""
    train = json.loads((CONFIGS / "train.json").read_text())
    inference = json.loads((CONFIGS / "inference.json").read_text())
    shared = [
        "image_size", "in_channels", "intensity_range", "rescale_16bit_images", "text_encoder", "max_text_length",
        "image_encoder", "layer_grouping", "removed_layer_group", "use_asrm", "use_text", "image_readers",
        "preprocessing_settings",
    ]  # fmt: skip
    assert {key: inference[key] for key in shared} == {key: train[key] for key in shared}
    run_time_only = {"pretrained", "image_encoder_checkpoint", "text_encoder_dtype", "gradient_checkpointing"}
    network = {k: v for k, v in train["network_def"].items() if k not in run_time_only}
    assert {k: v for k, v in inference["network_def"].items() if k not in run_time_only} == network
