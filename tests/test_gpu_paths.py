"""CPU tests of the GPU code paths: what the bundle asks of torch.cuda / torch.distributed, checked with
stand-ins that record the calls (no GPU on the CI machines)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from himix_monai.inferers import AutocastInferer, compute_dtype, has_native_bf16

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
FP16_SPELLINGS = ["fp16", "FP16", "float16", "torch.float16"]


@pytest.fixture
def gpu_of_capability(monkeypatch):
    """Pretend a CUDA device of the given compute capability is there."""

    def pretend(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: True)

    return pretend


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_falls_back_to_fp16_on_gpus_without_native_bf16(gpu_of_capability, capability, expected):
    gpu_of_capability(capability)
    assert has_native_bf16("cuda:0") == (capability >= (8, 0))
    assert compute_dtype("bf16", "cuda:0") == expected
    assert AutocastInferer("bf16").autocast_dtype("cuda") == expected
    assert compute_dtype("bf16", "cpu") == torch.bfloat16


def _trainer_amp(precision: str, device: str) -> bool:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"precision": precision, "device": f"$torch.device('{device}')"})
    return parser.get_parsed_content("train#trainer#amp")


@pytest.mark.parametrize("precision", FP16_SPELLINGS)
def test_every_fp16_spelling_trains_with_a_loss_scaler_on_gpu(gpu_of_capability, precision):
    gpu_of_capability((8, 0))
    assert _trainer_amp(precision, "cuda:0") is True
    assert _trainer_amp(precision, "cpu") is False  # CPU fp16 runs as bf16: no scaler needed


def test_bf16_trains_with_a_loss_scaler_only_where_it_becomes_fp16(gpu_of_capability):
    gpu_of_capability((8, 6))
    assert _trainer_amp("bf16", "cuda:0") is False
    gpu_of_capability((7, 0))
    assert _trainer_amp("bf16", "cuda:0") is True
    assert _trainer_amp("fp32", "cuda:0") is False


def test_multi_gpu_setup_binds_each_rank_to_its_own_gpu_before_joining(monkeypatch):
    """Every rank must call set_device(cuda:LOCAL_RANK) (the old expression never did: init_process_group
    returns None, so `(init() or ...) and set_device(...)` skipped it) and join the group once."""
    calls: list[tuple] = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    def init_process_group(backend=None, device_id=None, **kwargs):
        calls.append(("init_process_group", backend, str(device_id)))

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    parser.get_parsed_content("distributed_setup")
    assert calls == [("set_device", "cuda:1"), ("init_process_group", "nccl", "cuda:1")]


def test_multi_gpu_setup_on_cpu_joins_gloo_without_touching_cuda(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend=None, device_id=None, **kw: calls.append(("init", backend, device_id)))
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    parser.get_parsed_content("distributed_setup")
    assert calls == [("init", "gloo", None)]


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_is_deterministic_only_when_asked(monkeypatch, deterministic):
    from himix_monai.determinism import seed_run

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kwargs: None)
    try:
        seed_run(0, deterministic_algorithms=deterministic)
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.backends.cudnn.benchmark is (not deterministic)
        assert ("CUBLAS_WORKSPACE_CONFIG" in __import__("os").environ) is deterministic
    finally:
        seed_run(None)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False


def test_each_rank_caches_only_its_own_partition_of_the_training_data(monkeypatch, tmp_path):
    """Under DDP every rank used to cache the whole training set (CacheDataset + DistributedSampler)."""
    import json

    items = [{"image": f"img{i}.png", "label": f"mask{i}.png", "text": f"report {i}"} for i in range(6)]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": items, "validation": items[:1]}))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
        parser.update({"datalist": str(tmp_path / "datalist.json"), "check_data_files": False})
        parts.append([item["text"] for item in parser.get_parsed_content("train#dataset#data")])
    assert len(parts[0]) == len(parts[1]) == 3
    assert sorted(parts[0] + parts[1]) == sorted(item["text"] for item in items)


def test_gpu_input_pipeline_defaults(monkeypatch):
    """Workers, pinned memory and non-blocking copies on a GPU; none of them on the CPU."""
    for device, pinned in (("cuda:0", True), ("cpu", False)):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.json"))
        parser.update({"device": f"$torch.device('{device}')"})
        assert parser.get_parsed_content("pin_memory") is pinned
        assert (parser.get_parsed_content("num_workers") > 0) is pinned
        assert parser.get("train#dataloader#pin_memory") == "@pin_memory"
        assert parser.get("train#trainer#non_blocking") == parser.get("validate#evaluator#non_blocking") == "@pin_memory"


def test_gpu_smoke_script_skips_without_cuda_and_its_checks_run_on_the_cpu():
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "skipped"
    result = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--tiny", "--checks", "forward_backward,cpu_checkpoint"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(line["check"], line["status"]) for line in lines} >= {("forward_backward", "ok"), ("cpu_checkpoint", "ok")}
