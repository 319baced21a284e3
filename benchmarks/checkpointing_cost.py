#!/usr/bin/env python
"""
Cost of gradient checkpointing per set of ConvNeXt stages, in ONE process: the same network's steps alternate
between "no checkpointing", "stages 0-1", "stages 0-2" and "all stages" (timm's per-stage ``grad_checkpointing``
flag, per block), so all see the same machine; the step is timed in process CPU time (one thread: the work of the
step, whatever share of a busy CPU the process gets) and wall-clock. ``benchmarks/run.py``'s ``train_step``
set-up (bundle defaults), bf16, batch 8, 224x224. Prints one JSON line with the median per variant and the ratios
to no checkpointing. Example::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/checkpointing_cost.py --rounds 3 \\
        --output benchmarks/results/checkpointing_cost_one_process_2026-12-01.jsonl
    # the allocator setting's cost instead: mmap thresholds alternating
    python benchmarks/checkpointing_cost.py --allocator --precision fp32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {"none": (), "stages_0_1": (0, 1), "stages_0_2": (0, 1, 2), "all": (0, 1, 2, 3)}
# --allocator: no checkpointing (the bundle's default), steps alternating between mmap thresholds (32 MiB: glibc's
# ceiling, where its dynamic threshold ends up after the first steps; 2 MiB: configure_allocator's default; 4 MiB)
ALLOCATOR_VARIANTS = {"32MiB": 32 << 20, "2MiB": 2 << 20, "4MiB": 4 << 20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--allocator", action="store_true", help="vary glibc's mmap threshold instead of the checkpointed stages"
    )
    args = parser.parse_args(argv)
    import monai  # noqa: F401
    import torch

    import run as bench

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = bench.make_settings(False, True)
    net, loss_function, optimizer, inferer, batch = bench._train_setup(settings, args.precision)
    backbone = net.image_encoder.backbone
    stages = [backbone.stages_0, backbone.stages_1, backbone.stages_2, backbone.stages_3]

    variants = ALLOCATOR_VARIANTS if args.allocator else VARIANTS

    def use(variant: str) -> None:
        if args.allocator:
            from himix_monai.memory import configure_allocator

            configure_allocator(ALLOCATOR_VARIANTS[variant])
            return
        for index, stage in enumerate(stages):
            stage.grad_checkpointing = index in VARIANTS[variant]

    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    timer = bench.Timer()
    for name in variants:  # warm-up: one step of each
        use(name)
        bench._train_step(net, loss_function, optimizer, inferer, batch, args.precision, timer)
    load = os.getloadavg()[0]
    for round_index in range(args.rounds):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            use(name)
            start, cpu_start = time.perf_counter(), time.process_time()
            bench._train_step(net, loss_function, optimizer, inferer, batch, args.precision, timer)
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - start)
    base = statistics.median(cpu[next(iter(variants))])
    line = {
        "precision": args.precision, "batch": settings.train_batch, "image_size": settings.image_size,
        "rounds": args.rounds, "threads": torch.get_num_threads(),
        "step_cpu_ms": {n: round(1000 * statistics.median(v), 1) for n, v in cpu.items()},
        "step_wall_ms": {n: round(1000 * statistics.median(v), 1) for n, v in wall.items()},
        "varied": "mmap threshold" if args.allocator else "checkpointed stages",
        "cpu_ratio_to_first": {n: round(statistics.median(v) / base, 3) for n, v in cpu.items()},
        "cpu_all_steps_ms": {n: [round(1000 * x) for x in v] for n, v in cpu.items()},
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
    }  # fmt: skip
    print(json.dumps(line), flush=True)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
