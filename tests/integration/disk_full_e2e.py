#!/usr/bin/env python3
"""
End-to-end check that a training whose disk fills up stops with the project's message last and loses nothing.

Not part of the pytest suite: it mounts a small ``tmpfs`` (Linux, root) as the bundle root, so that the first
training checkpoint (about 6 MB for the tiny network) does not fit beside the best model (about 2 MB)::

    sudo python3 tests/integration/disk_full_e2e.py [--work DIR] [--size 5m]

Checks: the training exits with status 1; the last line of its output is ``error: Could not write
.../checkpoint_latest.pt: the disk that holds ... is full ...``; no partly written temporary file is left in
``models/``; the ``model.pt`` written before the disk filled still loads. The last line on stdout is one JSON
object with what was found; the exit status is 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--image_encoder", "test_convnext", "--network_def#num_heads", "4", "--demo_num_cases", "24",
    "--demo_image_size", "64", "--batch_size", "4", "--image_size", "[32,32]",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--size", default="5m", help="size of the tmpfs bundle root (default 5m)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="himix-disk-full-"))
    mount = work / "small_disk"
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size}", "tmpfs", str(mount)], check=True)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        command = [
            sys.executable, "-m", "monai.bundle", "run", "training",
            "--config_file", str(REPO / "bundle" / "configs" / "train.json"),
            "--bundle_root", str(mount / "run"), "--dataset_dir", str(work / "demo"), *TINY,
        ]  # fmt: skip
        print(" ".join(command), file=sys.stderr)
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        (work / "training.log").write_text(run.stdout + run.stderr)
        last_line = (run.stdout + run.stderr).strip().splitlines()[-1]
        models = mount / "run" / "models"
        leftovers = sorted(p.name for p in models.iterdir() if p.name.startswith(".") and p.name != ".training.lock")
        model_loads = False
        if (models / "model.pt").is_file():
            import torch

            torch.load(models / "model.pt", map_location="cpu", weights_only=True)
            model_loads = True
        found = {
            "exit_status": run.returncode,
            "last_line": last_line,
            "temporary_files_left": leftovers,
            "earlier_model_loads": model_loads,
        }
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    passed = (
        found["exit_status"] == 1
        and found["last_line"].startswith("error: Could not write ")
        and "checkpoint_latest.pt: the disk that holds" in found["last_line"]
        and not found["temporary_files_left"]
        and found["earlier_model_loads"]
    )
    print(json.dumps({**found, "passed": passed}))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
