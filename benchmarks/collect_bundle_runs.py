"""
Collect the figures of finished bundle training runs (and their evaluations) into one JSON file.

A run folder is a ``--bundle_root`` of ``python -m monai.bundle run training ...`` whose console output was saved as
``log.txt`` (``/usr/bin/time -v`` around the command adds the peak memory and the process wall time). Written per
run: the overrides (``overrides``, one line, if present), the val Dice of every epoch (network resolution, the
bundle's ``val_mean_dice``), the best and last, the training wall time (first ``Engine run`` line to the last
epoch's ``Complete``), the epoch times, the peak RSS and, when ``evaluate.json`` was run into ``<run>/eval``, its
``summary.json``.

    python benchmarks/collect_bundle_runs.py /tmp/k19/run_a /tmp/k19/run_b --out results.json

``--compare RUN_A RUN_B`` instead prints the paired difference of the two runs' evaluations (B - A) on the same
images, from ``eval/per_image_metrics.csv`` (network resolution) and ``eval/per_image_metrics_original_resolution.csv``:
the mean of the per-image Dice differences and its standard error (their standard deviation over sqrt(n)).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from datetime import datetime
from pathlib import Path

TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _seconds(clock: str) -> float:
    hours, minutes, seconds = (float(part) for part in clock.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def _stamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def collect(run: Path) -> dict:
    """The figures of one run folder (see the module docstring)."""
    log = (run / "log.txt").read_text(encoding="utf-8", errors="replace")
    dice = [float(v) for v in re.findall(r"Epoch\[\d+\] Metrics -- val_mean_dice: ([0-9.]+)", log)]
    epochs = re.findall(TIME + r" - ignite\.engine\.engine\.SupervisedTrainer - INFO - Epoch\[\d+\] Complete\. "
                        r"Time taken: ([0-9:.]+)", log)  # fmt: skip
    start = re.search(TIME + r" - ignite\.engine\.engine\.SupervisedTrainer - INFO - Engine run resuming", log)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    record = {
        "run": run.name,
        "overrides": (run / "overrides").read_text().strip() if (run / "overrides").is_file() else None,
        "commit": (run / "commit").read_text().strip() if (run / "commit").is_file() else None,
        "epochs": len(dice),
        "val_dice_per_epoch": dice,
        "best_val_dice": max(dice) if dice else None,
        "best_epoch": dice.index(max(dice)) + 1 if dice else None,
        "last_val_dice": dice[-1] if dice else None,
        "epoch_seconds": [round(_seconds(clock), 1) for _, clock in epochs],
        "training_wall_seconds": round((_stamp(epochs[-1][0]) - _stamp(start.group(1))).total_seconds(), 1)
        if start and epochs
        else None,
        "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
    }
    summary = run / "eval" / "summary.json"
    if summary.is_file():
        record["evaluation"] = json.loads(summary.read_text())
    return record


PER_IMAGE_FILES = {"network": "per_image_metrics.csv", "original": "per_image_metrics_original_resolution.csv"}


def _per_image_dice(path: Path) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8") as stream:
        return {row["image"]: float(row["dice"]) for row in csv.DictReader(stream) if row.get("dice") not in ("", None)}


def paired_difference(run_a: Path, run_b: Path) -> dict:
    """Dice of ``run_b`` minus ``run_a`` on the images both scored, per resolution: mean, standard error, n."""
    result: dict = {"a": run_a.name, "b": run_b.name}
    for resolution, name in PER_IMAGE_FILES.items():
        if not ((run_a / "eval" / name).is_file() and (run_b / "eval" / name).is_file()):
            continue
        dice_a, dice_b = _per_image_dice(run_a / "eval" / name), _per_image_dice(run_b / "eval" / name)
        differences = [dice_b[image] - dice_a[image] for image in sorted(dice_a.keys() & dice_b.keys())]
        if len(differences) < 2:
            continue
        result[resolution] = {
            "n": len(differences),
            "mean_difference": round(statistics.fmean(differences), 4),
            "standard_error": round(statistics.stdev(differences) / math.sqrt(len(differences)), 4),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (bundle roots with log.txt)")
    parser.add_argument("--out", type=Path, help="write the JSON here (default: print it)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"), help="paired Dice, B - A")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.compare):
        parser.error("give run folders to collect, or --compare RUN_A RUN_B")
    if args.compare:
        text = json.dumps(paired_difference(*args.compare), indent=1) + "\n"
    else:
        text = json.dumps([collect(run) for run in args.runs], indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
