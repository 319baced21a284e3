#!/usr/bin/env python
"""
2-D (``context_slices=0``) vs 2.5D (``context_slices=1, 2``) on the synthetic volume demo, under one budget.

Each ``k`` is trained by the bundle itself (``python -m monai.bundle run training --volume_data true
--context_slices k`` with the same settings, one after another, each a child process whose CPU time is measured)
and its best model (``models/model.pt``) is then scored on the demo's **test** volumes with the bundle's own volume
preprocessing (``volume#transforms`` of ``train.json``) and :py:class:`himix_monai.inferers.TextSliceInferer`:

- Dice per volume (mean ± std over the test volumes);
- Dice per slice over the slices that hold a lesion (mean ± std), and the share of lesion-free slices with a
  false-positive mask;
- the share of decoy-tube voxels predicted as lesion (the decoys are regenerated from the demo seed), which is
  what 2.5D is built to lower.

Writes ``OUT/results.json`` and ``OUT/results.md``::

    nice -n 5 python benchmarks/context_slices.py --out /tmp/ctx_bench --ks 0 1 2 --epochs 55 --learning-rate 1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundle" / "configs" / "train.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=55)
    parser.add_argument("--num", type=int, default=48, help="demo volumes")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--image-encoder", default="test_convnext")
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="volumes per iteration")
    parser.add_argument("--slices-per-volume", type=int, default=8)
    parser.add_argument("--val-interval", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--demo-seed", type=int, default=0, help="seed of the volume demo data")
    parser.add_argument("--skip-training", action="store_true", help="only score existing runs")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace, k: int) -> dict[str, object]:
    return {
        "dataset_dir": str(args.out / "data"),
        "volume_data": "true",
        "context_slices": k,
        "image_encoder": args.image_encoder,
        "network_def#num_heads": args.num_heads,
        "demo_num_cases": args.num,
        "demo_image_size": args.size,
        "volume_demo_depth": args.depth,
        "image_size": f"[{args.size},{args.size}]",
        "batch_size": args.batch_size,
        "slices_per_volume": args.slices_per_volume,
        "epochs": args.epochs,
        "val_interval": args.val_interval,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "demo_seed": args.demo_seed,
    }


def train(args: argparse.Namespace, k: int) -> dict[str, object]:
    root = args.out / f"k{k}"
    argv = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
    argv += ["--bundle_root", str(root)]
    for key, value in overrides(args, k).items():
        argv += [f"--{key}", str(value)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with open(args.out / f"k{k}.log", "w") as log:
        subprocess.run(argv, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    command = " ".join(["python", "-m", "monai.bundle", *argv[3:]])
    return {"command": command, "cpu_s": round(cpu, 1), "wall_s": round(time.time() - start, 1)}


def score(args: argparse.Namespace, k: int) -> dict[str, object]:
    import numpy as np
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from himix_monai.checkpoints import load_network_weights
    from himix_monai.demo.volumes import synthesize_chest_volume
    from himix_monai.inferers import TextSliceInferer

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["bundle_root"] = str(args.out / f"k{k}")
    for key, value in overrides(args, k).items():
        parser[key] = value
    parser["image_size"] = [args.size, args.size]
    network = parser.get_parsed_content("network_def")
    load_network_weights(network, args.out / f"k{k}" / "models" / "model.pt")
    network.eval()
    transform = Compose(parser.get_parsed_content("volume#transforms"))
    inferer = TextSliceInferer(roi_size=(args.size, args.size), sw_batch_size=24)
    items = json.loads((args.out / "data" / "datalist.json").read_text())["test"]
    volume_dice, slice_dice, empty_fp, decoy_hits, decoy_total = [], [], [], 0, 0
    with torch.no_grad():
        for item in items:
            data = transform(dict(item))
            logits = inferer(data["image"][None], network, data["input_ids"][None], data["attention_mask"][None])
            pred = (torch.sigmoid(logits[0, 0]) > 0.5).numpy()  # (W, H, D) MONAI layout
            label = data["label"][0].numpy() > 0.5
            inter, total = float((pred & label).sum()), float(pred.sum() + label.sum())
            volume_dice.append(2 * inter / total if total else 1.0)
            for z in range(label.shape[-1]):
                p, g = pred[..., z], label[..., z]
                if g.any():
                    slice_dice.append(2 * float((p & g).sum()) / float(p.sum() + g.sum()))
                else:
                    empty_fp.append(bool(p.any()))
            index = int(Path(item["image"]).name.split("_")[1].split(".")[0])
            case = synthesize_chest_volume(args.demo_seed, index, size=args.size, depth=args.depth, decoys=True)
            decoy = np.transpose(case.decoy_mask, (2, 1, 0)) > 0  # display (D, H, W) -> MONAI (W, H, D)
            decoy_hits += int((pred & decoy).sum())
            decoy_total += int(decoy.sum())
    return {
        "volumes": len(volume_dice),
        "volume_dice_mean": float(np.mean(volume_dice)),
        "volume_dice_std": float(np.std(volume_dice)),
        "volume_dice": [round(v, 4) for v in volume_dice],
        "lesion_slices": len(slice_dice),
        "slice_dice_mean": float(np.mean(slice_dice)),
        "slice_dice_std": float(np.std(slice_dice)),
        "empty_slices": len(empty_fp),
        "empty_slice_fp_rate": float(np.mean(empty_fp)) if empty_fp else float("nan"),
        "decoy_voxels_flagged": decoy_hits / decoy_total if decoy_total else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for k in args.ks:
        entry = results.get(str(k), {})
        if not args.skip_training:
            entry.update(train(args, k))
        entry.update(score(args, k))
        entry["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results[str(k)] = entry
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(f"k={k}: {entry}", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared, torch threads 1"
    lines = [
        f"Volume demo: {args.num} volumes {args.size}x{args.size}x{args.depth}, test split; encoder "
        f"{args.image_encoder}, {args.epochs} epochs, lr {args.learning_rate}, batch {args.batch_size} volumes x "
        f"{args.slices_per_volume} slices, training seed {args.seed}; {machine}.",
        "",
        "| k | Dice per volume | Dice per lesion slice | FP on lesion-free slices | decoy voxels flagged | CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in sorted(results.items()):
        lines.append(
            f"| {k} | {r['volume_dice_mean']:.3f} ± {r['volume_dice_std']:.3f} | {r['slice_dice_mean']:.3f} ± "
            f"{r['slice_dice_std']:.3f} | {100 * r['empty_slice_fp_rate']:.0f} % | "
            f"{100 * r['decoy_voxels_flagged']:.1f} % "
            f"| {r.get('cpu_s', '?')} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
