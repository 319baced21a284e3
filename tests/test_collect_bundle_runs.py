"""benchmarks/collect_bundle_runs.py reads the figures of a bundle training from its saved console output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "collect_bundle_runs.py"

LOG = """\
2026-12-01 21:28:08,258 - ignite.engine.engine.SupervisedTrainer - INFO - Engine run resuming from iteration 0, epoch 0 until 2 epochs
2026-12-01 21:29:16,433 - ignite.engine.engine.SupervisedEvaluator - INFO - Engine run resuming from iteration 0, epoch 0 until 1 epochs
2026-12-01 21:29:19,122 - INFO - Epoch[1] Metrics -- val_mean_dice: 0.5509 val_mean_iou: 0.4255
2026-12-01 21:29:19,784 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. Time taken: 00:01:11.524
2026-12-01 21:30:20,881 - INFO - Epoch[2] Metrics -- val_mean_dice: 0.6265 val_mean_iou: 0.4989
2026-12-01 21:30:21,328 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[2] Complete. Time taken: 00:01:01.543
\tMaximum resident set size (kbytes): 2197716
"""  # fmt: skip


def test_collects_dice_times_memory_and_evaluation(tmp_path):
    run = tmp_path / "run_a"
    (run / "eval").mkdir(parents=True)
    (run / "log.txt").write_text(LOG)
    (run / "overrides").write_text("--epochs 2\n")
    (run / "eval" / "summary.json").write_text(json.dumps({"dice_mean": 0.6}))
    out = tmp_path / "runs.json"
    subprocess.run([sys.executable, str(SCRIPT), str(run), "--out", str(out)], check=True)
    (record,) = json.loads(out.read_text())
    assert record["val_dice_per_epoch"] == [0.5509, 0.6265]
    assert (record["best_val_dice"], record["best_epoch"], record["last_val_dice"]) == (0.6265, 2, 0.6265)
    assert record["epoch_seconds"] == [71.5, 61.5]
    assert record["training_wall_seconds"] == 133.1  # 21:28:08.258 -> 21:30:21.328
    assert record["peak_rss_mb"] == 2146 and record["overrides"] == "--epochs 2"
    assert record["evaluation"] == {"dice_mean": 0.6}


def test_compare_gives_the_paired_dice_difference_on_shared_images(tmp_path):
    rows = {
        "a": [("x.jpg", 0.5), ("y.jpg", 0.7), ("z.jpg", 0.9)],
        "b": [("x.jpg", 0.6), ("y.jpg", 0.9), ("w.jpg", 0.1)],
    }
    for run, scores in rows.items():
        (tmp_path / run / "eval").mkdir(parents=True)
        lines = ["image,dice,iou"] + [f"{image},{dice},0.5" for image, dice in scores]
        (tmp_path / run / "eval" / "per_image_metrics.csv").write_text("\n".join(lines) + "\n")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--compare", str(tmp_path / "a"), str(tmp_path / "b")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result = json.loads(completed.stdout)
    assert result["network"] == {"n": 2, "mean_difference": 0.15, "standard_error": 0.05}  # x: +0.1, y: +0.2
    assert "original" not in result  # no original-resolution CSVs


def test_runs_and_compare_are_exclusive(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--compare", "a", "b"], capture_output=True)
    assert completed.returncode == 2
