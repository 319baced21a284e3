"""Bundle tooling: verify_net_in_out, TorchScript export round trip, and a 2-process gloo DDP training run."""

from __future__ import annotations

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
    from himix_monai.export import example_inputs, export_torchscript
    from himix_monai.networks import HiMix

    torch.manual_seed(0)
    net = HiMix(in_channels=1, text_encoder=tiny_bert, image_encoder="test_convnext", num_heads=4, text_length=24)
    net.eval()
    path = tmp_path / "model.ts"
    export_torchscript(net, path, image_size=(64, 64), extra_files={"metadata.json": "{}"})
    loaded = torch.jit.load(str(path))
    # a batch size, image size and text other than the traced ones
    image, input_ids, attention_mask = example_inputs(net, (96, 64), in_channels=1, batch_size=3)
    input_ids[1, :5] = torch.tensor([7, 8, 9, 10, 11])
    with torch.no_grad():
        expected = net(image, input_ids, attention_mask)
        actual = loaded(image, input_ids, attention_mask)
    assert actual.shape == (3, 1, 96, 64)
    assert torch.allclose(actual, expected, atol=1e-4)


def test_export_command_builds_from_the_bundle_config(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"image_encoder": "test_convnext", "network_def#num_heads": 4})
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "model.ts"
    result = run_command(
        [sys.executable, "-m", "himix_monai.export", "--config_file", str(CONFIGS / "train.json"),
         "--ckpt_file", str(tmp_path / "model.pt"), "--filepath", str(out),
         "--meta_file", str(CONFIGS / "metadata.json"), "--image_size", "64", "64",
         "--image_encoder", "test_convnext", "--network_def#num_heads", "4"]
    )  # fmt: skip
    assert out.is_file() and "verified" in result.stdout
    extra = {"metadata.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    metadata = extra["metadata.json"]
    assert '"network_data_format"' in (metadata.decode() if isinstance(metadata, bytes) else metadata)


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
