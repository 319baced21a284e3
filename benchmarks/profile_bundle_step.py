#!/usr/bin/env python
"""
Where the bundle's own training iterations spend their time, for any configs and overrides (a preset exactly as
it trains), on real data.

``benchmarks/profile_step.py`` profiles a fixed network on synthetic tensors; this one builds ``train#trainer``
from the bundle's configs, runs ``--warmup`` iterations, then ``--iterations`` more under ``torch.profiler``,
and stops before the epoch ends (no validation, no checkpoint). Per iteration it reports the time spent getting
the batch (``CacheDataset`` + augmentation; ``num_workers`` as configured) and in the rest of the iteration
(forward, loss, backward, optimizer step, iteration handlers), and the operators' self CPU time grouped as in
``profile_step.py``. One JSON line (``--output`` appends it), then a short table. Example, the Kvasir CPU preset::

    OMP_NUM_THREADS=2 python benchmarks/profile_bundle_step.py \\
        --config_file bundle/configs/train.json bundle/configs/datasets/kvasir_cpu.json \\
        --set dataset_dir=/data/kvasir_seg --set datalist=/data/kvasir_seg/datalist_p9.json

Run it on an idle machine: ``load_avg_1m`` at the start is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from profile_step import CATEGORIES, categorize  # noqa: E402

OPTIMIZER_OPS = ("aten::_fused_adamw_", "aten::_foreach_zero_", "aten::zero_")


def parse_setting(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as JSON when it parses (numbers, lists, booleans), else as a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set image_size=[160,160]")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def profile_bundle(config_files: list[str], settings: dict, warmup: int, iterations: int) -> dict:
    """Build the bundle's trainer and profile ``iterations`` iterations after ``warmup``; see the module docstring."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from torch.profiler import ProfilerActivity, profile

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as bundle_root:
        parser = ConfigParser()
        parser.read_config(config_files)
        parser.update({"bundle_root": bundle_root, **settings})
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        trainer.state.max_epochs = 1
        trainer.state.epoch_length = warmup + iterations
        data_s: list[float] = []
        step_s: list[float] = []
        marks: dict[str, float] = {}
        profiler = profile(activities=[ProfilerActivity.CPU])

        @trainer.on(Events.GET_BATCH_STARTED)
        def batch_started(engine) -> None:
            if engine.state.iteration == warmup:
                profiler.__enter__()
            marks["batch"] = time.perf_counter()

        @trainer.on(Events.GET_BATCH_COMPLETED)
        def batch_completed(engine) -> None:
            marks["step"] = time.perf_counter()
            if engine.state.iteration >= warmup:
                data_s.append(marks["step"] - marks["batch"])

        @trainer.on(Events.ITERATION_COMPLETED)
        def iteration_completed(engine) -> None:
            if engine.state.iteration > warmup:
                step_s.append(time.perf_counter() - marks["step"])
            if engine.state.iteration == warmup + iterations:
                profiler.__exit__(None, None, None)
                engine.terminate()

        trainer.run()

    totals = Counter(dict.fromkeys(CATEGORIES, 0.0))
    top: dict[str, float] = {}
    for event in profiler.key_averages():
        if event.key.startswith(("Optimizer.", "enumerate(DataLoader)", "ProfilerStep")):
            continue
        category = "optimizer" if event.key in OPTIMIZER_OPS else categorize(event.key)
        totals[category] += event.self_cpu_time_total / 1000 / iterations
        top[event.key] = event.self_cpu_time_total / 1000 / iterations
    data_ms = 1000 * statistics.median(data_s)
    totals["data"] = data_ms
    total = sum(totals.values())
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(load, 2),
        "config_files": config_files,
        "settings": settings,
        "warmup": warmup,
        "iterations": iterations,
        "data_ms_per_batch": round(data_ms, 1),
        "rest_of_iteration_ms": round(1000 * statistics.median(step_s), 1),
        "ms": {k: round(v, 1) for k, v in totals.items()},
        "fractions": {k: round(v / total, 3) for k, v in totals.items()},
        "top_ops_ms": {k: round(v, 1) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_file", nargs="+", default=[str(HERE.parent / "bundle/configs/train.json")])
    parser.add_argument("--set", type=parse_setting, action="append", default=[], help="KEY=VALUE config override")
    parser.add_argument("--warmup", type=int, default=5, help="iterations before profiling (default 5)")
    parser.add_argument("--iterations", type=int, default=10, help="iterations profiled (default 10)")
    parser.add_argument("--output", type=Path, default=None, help="append the JSON line to this file")
    args = parser.parse_args()
    if args.warmup < 1 or args.iterations < 1:
        parser.error("--warmup and --iterations must be at least 1")
    result = profile_bundle(args.config_file, dict(args.set), args.warmup, args.iterations)
    line = json.dumps(result)
    print(line)
    if args.output is not None:
        with open(args.output, "a") as stream:
            stream.write(line + "\n")
    print(f"{'part':16s} {'ms/iteration':>12s} {'share':>6s}")
    for key, value in sorted(result["ms"].items(), key=lambda kv: -kv[1]):
        print(f"{key:16s} {value:12.1f} {result['fractions'][key]:6.1%}")


if __name__ == "__main__":
    main()
