"""benchmarks/profile_bundle_step.py profiles the bundle's own trainer, built from its configs and overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "profile_bundle_step.py"


def test_profiles_the_configured_trainer_and_stops_before_the_epoch_ends(tmp_path):
    output = tmp_path / "profile.jsonl"
    settings = {
        "dataset_dir": str(tmp_path / "demo"), "demo_num_cases": 24, "demo_image_size": 64,
        "image_encoder": "test_convnext", "network_def#num_heads": 4, "batch_size": 2, "image_size": "[32,32]",
    }  # fmt: skip
    command = [sys.executable, str(SCRIPT), "--warmup", "2", "--iterations", "3", "--output", str(output)]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (line,) = output.read_text().splitlines()
    result = json.loads(line)
    assert result["settings"]["image_size"] == [32, 32] and result["settings"]["image_encoder"] == "test_convnext"
    assert (result["warmup"], result["iterations"]) == (2, 3)
    assert result["ms"]["convolution"] > 0 and result["data_ms_per_batch"] > 0
    assert abs(sum(result["fractions"].values()) - 1) < 0.01
    assert "Epoch: 1/1, Iter: 5/" in completed.stdout + completed.stderr  # warmup + iterations ran
    assert "Iter: 6/" not in completed.stdout + completed.stderr  # then the trainer stopped
    assert "val_mean_dice" not in completed.stdout + completed.stderr  # no validation at an epoch's end


def test_a_setting_without_a_value_is_refused():
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--set", "image_size"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    assert "--set 'image_size': expected KEY=VALUE" in completed.stderr.splitlines()[-1]
