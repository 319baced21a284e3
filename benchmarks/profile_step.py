#!/usr/bin/env python
"""
Where one training step spends its time: ``torch.profiler`` around one step of ``benchmarks/run.py``'s
``train_step`` (the bundle's set-up; ``--checkpointing`` / ``--allocator`` add its low-memory options;
ConvNeXt-Tiny + a random
12x768 BERT, fused AdamW, ``DiceCELoss``, ``AutocastInferer``), plus one batch of the bundle's training input
pipeline (``train.json``'s ``base_transforms`` + augmentation on demo images, ``num_workers=0``) timed separately.

The operators' self CPU time (no double counting) is grouped into convolution, attention (SDPA), norms, FFT
(ASRM's spectral filter), linear/matmul, casts and copies, other elementwise/reductions, and the optimizer step
(everything inside ``optimizer.step()``); ``data`` is the measured pipeline time per batch. One JSON line per
(precision, image size) with the fractions and milliseconds, then a table. Example::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_step.py --precisions bf16,fp32 \\
        --sizes 224,128 --output benchmarks/results/profile_step.jsonl

Each (precision, size) runs in a fresh process (``--one`` runs one here). The fractions are shares of the same
step, so they hold on a busy machine better than absolute times do; ``load_avg_1m`` is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CATEGORIES = ("convolution", "attention", "norms", "fft", "linear/matmul", "casts/copies", "other ops", "optimizer")


def categorize(name: str) -> str:
    """The category of a profiler operator name (``aten::...``)."""
    n = name.lower()
    if "conv" in n:
        return "convolution"
    if "scaled_dot_product" in n or "flash_attention" in n or "softmax" in n:
        return "attention"
    if "norm" in n:  # layer_norm, batch_norm (instance norm), group_norm, and their backward
        return "norms"
    if "fft" in n:
        return "fft"
    if any(k in n for k in ("addmm", "aten::mm", "bmm", "matmul", "linear", "aten::baddbmm")):
        return "linear/matmul"
    if any(k in n for k in ("copy_", "aten::to", "_to_copy", "contiguous", "clone")):
        return "casts/copies"
    return "other ops"


def data_ms_per_batch(precision: str, size: int, batch: int) -> float:
    """Median time of one batch of the bundle's training pipeline (``CacheDataset`` + augmentation, no workers)."""
    import statistics

    from monai.bundle import ConfigParser
    from monai.data import CacheDataset, DataLoader

    from himix_monai.demo.slices import ensure_demo_dataset

    with tempfile.TemporaryDirectory() as folder:
        ensure_demo_dataset(folder, num=2 * batch, seed=0, size=size)
        parser = ConfigParser()
        parser.read_config(str(HERE.parent / "bundle" / "configs" / "train.json"))
        parser.update(
            {"bundle_root": folder, "dataset_dir": folder, "image_size": [size, size], "precision": precision}
        )
        datalist = parser.get_parsed_content("train#datalist")
        transform = parser.get_parsed_content("train#preprocessing")
        dataset = CacheDataset(datalist, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=0)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in loader:
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
    return round(1000 * statistics.median(times[1:] or times), 1)


def profile_one(precision: str, size: int, warmup: int, checkpointing: bool = False, allocator: bool = False) -> dict:
    import dataclasses

    import monai  # noqa: F401
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import run as bench

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = dataclasses.replace(bench.make_settings(False, True), image_size=size)
    net, loss_function, optimizer, inferer, batch = bench._train_setup(
        settings, precision, allocator=allocator, gradient_checkpointing=checkpointing
    )
    image, label, input_ids, attention_mask = batch
    timer = bench.Timer()
    for _ in range(warmup):
        bench._train_step(net, loss_function, optimizer, inferer, batch, precision, timer)
    load = os.getloadavg()[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with record_function("step_forward_backward"):
            with bench.autocast_context(precision):
                texts = net.encode_text(input_ids, attention_mask)
            with bench.precomputed_text(net, texts):
                loss = loss_function(inferer(image, net, input_ids, attention_mask), label)
            loss.backward()
        with record_function("step_optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_s = time.perf_counter() - start
    events = prof.key_averages()
    optimizer_ms = next(e.cpu_time_total for e in events if e.key == "step_optimizer") / 1000
    totals = dict.fromkeys(CATEGORIES, 0.0)
    top: dict[str, float] = {}
    for event in events:
        if event.key.startswith("step_") or event.key.startswith("Optimizer."):
            continue
        totals[categorize(event.key)] += event.self_cpu_time_total / 1000
        top[event.key] = event.self_cpu_time_total / 1000
    # ops inside optimizer.step() are counted under "optimizer", not under their own category
    opt_events = [e for e in events if e.key in ("aten::_fused_adamw_", "aten::zero_", "aten::_foreach_zero_")]
    for event in opt_events:
        totals[categorize(event.key)] -= event.self_cpu_time_total / 1000
    totals["optimizer"] = optimizer_ms
    data_ms = data_ms_per_batch(precision, size, settings.train_batch)
    total = sum(totals.values()) + data_ms
    result = {
        "precision": precision,
        "image_size": size,
        "batch": settings.train_batch,
        "step_ms_profiled": round(1000 * step_s, 1),
        "data_ms_per_batch": data_ms,
        "ms": {k: round(v, 1) for k, v in totals.items()} | {"data": data_ms},
        "fractions": {k: round(v / total, 3) for k, v in totals.items()} | {"data": round(data_ms / total, 3)},
        "top_ops_ms": {k: round(v, 1) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
        "threads": torch.get_num_threads(),
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
        "gradient_checkpointing": checkpointing,
        "allocator_configured": allocator,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--sizes", default="224,128", help="image sizes (batch 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="append the JSON lines here")
    parser.add_argument("--checkpointing", action="store_true", help="with --gradient_checkpointing true")
    parser.add_argument("--allocator", action="store_true", help="with --low_memory_allocator true")
    parser.add_argument("--one", default=None, help="PRECISION,SIZE: run one profile in this process")
    args = parser.parse_args(argv)
    if args.one:
        precision, size = args.one.split(",")
        line = profile_one(precision, int(size), args.warmup, args.checkpointing, args.allocator)
        print(json.dumps(line), flush=True)
        return 0
    lines = []
    for precision in args.precisions.split(","):
        for size in args.sizes.split(","):
            command = [sys.executable, __file__, "--one", f"{precision},{size}", "--warmup", str(args.warmup)]
            flags = (("--checkpointing", args.checkpointing), ("--allocator", args.allocator))
            command += [flag for flag, on in flags if on]
            completed = subprocess.run(command, capture_output=True, text=True)
            found = [json.loads(t) for t in completed.stdout.splitlines() if t.startswith("{")]
            if not found:
                print(f"# {precision} {size}: failed: {completed.stderr.strip()[-1500:]}", file=sys.stderr)
                continue
            lines.append(found[0])
            print(json.dumps(found[0]), flush=True)
            if args.output:
                with open(args.output, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(found[0]) + "\n")
    print("| precision, size | " + " | ".join((*CATEGORIES, "data")) + " | profiled step |")
    print("|---" * (len(CATEGORIES) + 3) + "|")
    for line in lines:
        cells = [f"{100 * line['fractions'][k]:.0f}%" for k in (*CATEGORIES, "data")]
        step = f"{line['step_ms_profiled']:.0f} ms"
        print(f"| {line['precision']}, {line['image_size']} | " + " | ".join(cells) + f" | {step} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
