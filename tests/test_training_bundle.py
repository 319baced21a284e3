"""End-to-end tests of bundle/configs/train.json through the real ``python -m monai.bundle run training`` command.

A tiny configuration (``test_convnext`` image encoder, 4 attention heads, 24 demo cases of 64 pixels, batch 4,
32-pixel network input: 4 iterations per epoch) keeps each run short. The fresh 5-epoch run is shared (module
fixture) by the end-to-end, determinism and checkpoint-loading tests and by ``test_reliability.py`` (resume).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from himix_monai.data.demo import ensure_demo_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "bundle" / "configs" / "train.json"
DEMO_CASES = 24  # 16 training, 4 validation, 4 test cases
EPOCHS = 5  # 4 iterations per epoch: 20 iterations
TINY = {
    "image_encoder": "test_convnext",
    "network_def#num_heads": 4,
    "demo_num_cases": DEMO_CASES,
    "demo_image_size": 64,
    "batch_size": 4,
    "image_size": "[32,32]",
}


def bundle_args(bundle_root: Path, **overrides) -> list[str]:
    """The ``python -m monai.bundle run training`` command line with the tiny settings and ``overrides``."""
    settings = {**TINY, "bundle_root": str(bundle_root), **overrides}
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN_CONFIG)]
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    return command


def bundle_env() -> dict[str, str]:
    """Offline, unbuffered, one thread: on a shared 2-core machine several OpenMP threads per run were 10x slower."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def run_training(bundle_root: Path, expect_ok: bool = True, **overrides) -> subprocess.CompletedProcess:
    """Run the bundle's ``training``; output is stdout and stderr together. Fails the test on an unexpected exit."""
    proc = subprocess.run(
        bundle_args(bundle_root, **overrides),
        cwd=REPO,
        env=bundle_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"training failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    if not expect_ok and proc.returncode == 0:
        pytest.fail(f"training was expected to fail but exited with 0:\n{proc.stdout[-3000:]}")
    return proc


def read_losses(path: Path) -> list[tuple[int, int, float]]:
    """``(epoch, iteration, loss)`` rows of the loss CSV written by ``LossCSVWriter``."""
    with open(path, newline="") as stream:
        return [(int(r["epoch"]), int(r["iteration"]), float(r["loss"])) for r in csv.DictReader(stream)]


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


_SHARED: dict[str, object] = {}  # session results shared with test_reliability.py, which imports these fixtures


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The tiny demo dataset, generated once and shared by the bundle runs (``--dataset_dir``)."""
    if "demo_dir" not in _SHARED:
        folder = tmp_path_factory.mktemp("demo")
        ensure_demo_dataset(folder, num=DEMO_CASES, seed=0, size=TINY["demo_image_size"])
        _SHARED["demo_dir"] = folder
    return _SHARED["demo_dir"]


@pytest.fixture(scope="session")
def fresh_run(tmp_path_factory, demo_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """A complete, uninterrupted 5-epoch training run: its bundle root and process result (run once per session,
    also when another test module imports this fixture)."""
    if "fresh_run" not in _SHARED:
        root = tmp_path_factory.mktemp("fresh")
        _SHARED["fresh_run"] = (root, run_training(root, dataset_dir=demo_dir, epochs=EPOCHS))
    return _SHARED["fresh_run"]


def test_training_writes_best_model_latest_state_and_loss_log(fresh_run):
    root, proc = fresh_run
    models = root / "models"
    assert (models / "model.pt").is_file()
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_latest.pt", "model.pt"]  # no temp files left

    state = load_state(models / "checkpoint_latest.pt")  # plain state dicts: loads with weights_only=True
    meta = state["meta"]
    assert (meta["epoch"], meta["iteration"], meta["epoch_length"]) == (EPOCHS, 4 * EPOCHS, 4)
    assert dict(state["trainer"]) == {"epoch_length": 4, "iteration": 4 * EPOCHS, "max_epochs": EPOCHS}
    assert set(state["early_stopping"]) >= {"counter", "best_score"}
    assert state["evaluator"]["best_metric_epoch"] >= 1
    assert len(state["best_model_saver"]["_saved"]) == 1  # (score, name) of the best model, written as model.pt
    assert state["lr_scheduler"]["last_epoch"] == EPOCHS
    # the frozen text encoder is left out and recorded by name and checksum; the trained weights are all there
    assert meta["frozen_weights"]["keys"] and not any(k.startswith("text_encoder.") for k in state["network"])
    assert "image_encoder.backbone.stem_0.weight" in state["network"]
    assert set(meta["network_signature"]["num_heads"].values()) == {4}

    losses = read_losses(root / "logs" / "train_loss.csv")
    assert [(e, i) for e, i, _ in losses] == [(1 + (i - 1) // 4, i) for i in range(1, 4 * EPOCHS + 1)]
    assert "saved the training state at epoch 5, iteration 20" in proc.stdout
    assert "PILReader: unable to load" not in proc.stdout  # reader fall-through noise is silenced


def test_two_runs_with_the_same_seed_give_the_same_losses(fresh_run, demo_dir, tmp_path):
    """Determinism on CPU: the first 20 per-iteration losses of two runs are bitwise equal."""
    root, _ = fresh_run
    run_training(tmp_path, dataset_dir=demo_dir, epochs=EPOCHS)
    first = read_losses(root / "logs" / "train_loss.csv")[:20]
    second = read_losses(tmp_path / "logs" / "train_loss.csv")[:20]
    assert len(first) == 20
    assert first == second
    assert len({loss for _, _, loss in first}) > 1  # the losses change: the network trains


def test_config_workflow_has_the_train_properties(demo_dir, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(TRAIN_CONFIG), workflow_type="train", bundle_root=str(tmp_path))
    for key, value in {**TINY, "image_size": [32, 32], "dataset_dir": str(demo_dir)}.items():
        workflow.parser[key] = value
    workflow.initialize()
    try:
        assert workflow.check_properties() == []
        assert workflow.max_epochs == 30
        assert workflow.train_inferer is workflow.val_inferer
    finally:
        workflow.finalize()


def test_cli_booleans_given_as_text(tmp_path):
    """``--resume false`` arrives as the string "false": the bundle's settings read it as False."""
    from himix_monai.training import TrainingStateCheckpoint, as_bool

    assert [as_bool(v) for v in ("true", "True", "1", "yes", 1, True)] == [True] * 6
    assert [as_bool(v) for v in ("false", "False", "0", "no", 0, False, None)] == [False] * 7
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        as_bool("maybe", "resume")
    assert TrainingStateCheckpoint(tmp_path / "state.pt", {"net": torch.nn.Linear(1, 1)}, resume="false").resume is False
    assert TrainingStateCheckpoint(tmp_path / "state.pt", {"net": torch.nn.Linear(1, 1)}, resume="true").resume is True
