#!/usr/bin/env python
"""
Training step of HiMix-MONAI next to the official HiMix code (JaeyoonSSim/HiMix), fresh processes alternating.

The official code is NOT part of this repository: fetch it into a scratch folder outside it and pass that folder
with ``--official``. The one change it needs on a CPU: ``LFM.make_gaussian`` (its ASRM) puts the Gaussian on
``.cuda()``; make it use the input's device (``make_gaussian(..., device=x.device)``). Both networks get random
weights and the same sizes: a 12-layer, 768-wide ``BertModel(BertConfig())`` (CXR-BERT's size) and ConvNeXt-T
(``ConvNextModel`` with the official ``lib/convnext-tiny-224/config.json``; timm's ``convnext_tiny`` for ours),
batch 8, 3x224x224, 24 tokens. Each side trains as its own code does: the official one with its Lightning
module's ``AdamW(model.parameters(), lr=3e-4)`` and ``DiceCELoss()`` on its sigmoid output, fp32 weights, the
frozen BERT in fp32, bf16 as plain ``torch.autocast`` around forward and loss; ours as ``benchmarks/run.py``'s
``train_step`` (the bundle's set-up: fused AdamW, text encoder stored in the compute dtype,
``AutocastInferer``; ``--checkpointing`` / ``--allocator`` add ``--gradient_checkpointing true`` /
``--low_memory_allocator true``). Example::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/official_comparison.py --official /tmp/official \\
        --precisions bf16,fp32 --repeats 2 --output benchmarks/results/official_comparison.jsonl

Prints one JSON line per process (step median in wall-clock and in process CPU time, images/s, peak RSS), then
per precision the ratio of adjacent pairs (official step / ours = our speed-up, in CPU time: with one thread that
is the work of the step whatever share of a busy machine the process got) and their median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def official_setup(official: Path, batch: int, size: int, length: int):
    """The official network with random weights, its optimizer and loss, and one batch."""
    sys.path.insert(0, str(official))
    import torch
    from monai.losses import DiceCELoss
    from transformers import BertConfig, BertModel, ConvNextConfig, ConvNextModel

    from utils import model_himix  # the official package (official/utils/model_himix.py)

    def random_model(name, **kwargs):  # stands in for AutoModel.from_pretrained: no download, random weights
        if "convnext" in name:
            config = official / "lib" / "convnext-tiny-224" / "config.json"
            return ConvNextModel(ConvNextConfig.from_json_file(str(config)))
        return BertModel(BertConfig())

    model_himix.AutoModel.from_pretrained = staticmethod(random_model)
    torch.manual_seed(0)
    model = model_himix.HiMix("bert", "convnext", project_dim=768).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loss_function = DiceCELoss()
    torch.manual_seed(1)
    image = torch.rand(batch, 3, size, size)
    label = (torch.rand(batch, 1, size, size) > 0.7).float()
    import run as bench

    ids, mask = bench.random_tokens(batch, length, BertConfig().vocab_size)
    return model, optimizer, loss_function, (image, {"input_ids": ids, "attention_mask": mask}), label


def time_official(official: Path, precision: str, warmup: int, steps: int) -> dict:
    import torch

    model, optimizer, loss_function, data, label = official_setup(official, 8, 224, 24)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, cpu_times = [], []
    for _ in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            loss = loss_function(model(data), label)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "step_ms": round(1000 * statistics.median(times[warmup:]), 1),
        "step_cpu_ms": round(1000 * statistics.median(cpu_times[warmup:]), 1),
    }


def time_ours(precision: str, warmup: int, steps: int, checkpointing: bool = False, allocator: bool = False) -> dict:
    import run as bench

    settings = bench.make_settings(False, True)
    net, loss_function, optimizer, inferer, batch = bench._train_setup(
        settings, precision, allocator=allocator, gradient_checkpointing=checkpointing
    )
    timer = bench.Timer()
    for _ in range(warmup + steps):
        bench._train_step(net, loss_function, optimizer, inferer, batch, precision, timer)
    timer.drop_first(warmup)
    medians = timer.medians_ms()
    return {"step_ms": medians["step_ms"], "step_cpu_ms": medians["step_cpu_ms"]}


def run_here(
    code: str, precision: str, official: Path, warmup: int, steps: int, checkpointing: bool = False,
    allocator: bool = False,
) -> dict:  # fmt: skip
    import resource

    import monai  # noqa: F401
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load = os.getloadavg()[0]
    if code == "official":
        result = time_official(official, precision, warmup, steps)
    else:
        result = time_ours(precision, warmup, steps, checkpointing, allocator)
        result.update(gradient_checkpointing=checkpointing, allocator_configured=allocator)
    result.update(
        code=code, precision=precision, batch=8, image_size=224, steps=steps,
        images_per_s=round(8000 / result["step_ms"], 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        threads=torch.get_num_threads(), load_avg_1m=[round(load, 2), round(os.getloadavg()[0], 2)],
    )  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="folder of the fetched official code")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--repeats", type=int, default=2, help="pairs per precision")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="append the JSON lines here")
    parser.add_argument("--checkpointing", action="store_true", help="our side with --gradient_checkpointing true")
    parser.add_argument("--allocator", action="store_true", help="our side with --low_memory_allocator true")
    parser.add_argument("--one", default=None, help="CODE,PRECISION: one run in this process")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.one:
        code, precision = args.one.split(",")
        line = run_here(
            code, precision, args.official.resolve(), args.warmup, args.steps, args.checkpointing, args.allocator,
        )  # fmt: skip
        print(json.dumps(line), flush=True)
        return 0
    ratios: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for precision in args.precisions.split(","):
            order = ("ours", "official") if repeat % 2 == 0 else ("official", "ours")
            pair = {}
            for code in order:
                command = [sys.executable, __file__, "--official", str(args.official), "--one", f"{code},{precision}",
                           "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
                command += ["--checkpointing"] if args.checkpointing else []
                command += ["--allocator"] if args.allocator else []
                completed = subprocess.run(command, capture_output=True, text=True)
                found = [json.loads(t) for t in completed.stdout.splitlines() if t.startswith("{")]
                if not found:
                    print(f"# {code} {precision}: failed: {completed.stderr.strip()[-1500:]}", file=sys.stderr)
                    continue
                pair[code] = found[0] | {"pair": repeat}
                print(json.dumps(pair[code]), flush=True)
                if args.output:
                    with open(args.output, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(pair[code]) + "\n")
            if len(pair) == 2:
                key = "step_cpu_ms" if all("step_cpu_ms" in line for line in pair.values()) else "step_ms"
                ratios.setdefault(precision, []).append(pair["official"][key] / pair["ours"][key])
                print(f"# {precision} pair {repeat}: official / ours = {ratios[precision][-1]:.3f}", flush=True)
    for precision, values in ratios.items():
        print(f"# {precision}: our speed-up over the official code {statistics.median(values):.3f} (pairs: "
              f"{', '.join(f'{v:.3f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
