"""Run safety of the training bundle: nothing an earlier run made is lost, one training per folder at a time, a
resumed run is the same run, and a run that cannot succeed stops at its start.

End-to-end checks go through the real ``python -m monai.bundle run training`` command with the tiny settings of
``test_training_bundle.py`` (whose fresh 5-epoch run is the uninterrupted reference); the others run the guard
(:py:mod:`himix_monai.run_guard`) or the config's own expressions in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

from monai.bundle import ConfigParser

from himix_monai.data.resumable import ResumableDataLoader
from himix_monai.run_guard import OutputGuard, RunGuardError, TrainingRunGuard, remove_stale_temp_files
from tests.test_training_bundle import (  # noqa: F401 - fixtures shared with the end-to-end tests
    EPOCHS,
    TINY,
    TRAIN_CONFIG,
    demo_dir,
    fresh_run,
    fresh_runs,
    load_state,
    read_losses,
    run_training,
)

EVALUATE_CONFIG = TRAIN_CONFIG.parent / "evaluate.json"


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


# ----------------------------------------------------------------------------------------------------------------
# 1. a second training does not destroy the first


def test_a_new_training_does_not_overwrite_an_earlier_one(demo_dir, tmp_path):
    run_training(tmp_path, dataset_dir=demo_dir, epochs=1)
    models = tmp_path / "models"
    before = _hashes(models)
    assert set(before) == {"model.pt", "checkpoint_latest.pt", ".training.lock"}

    again = run_training(tmp_path, expect_ok=False, dataset_dir=demo_dir, epochs=1, seed=1)
    assert f"RunGuardError: {models} already holds model.pt and checkpoint_latest.pt of an earlier training" in (
        again.stdout
    )
    for way in ("--resume true", "--overwrite true", "another --bundle_root"):
        assert way in again.stdout
    assert _hashes(models) == before  # nothing was written
    assert "Epoch[1]" not in again.stdout

    replaced = run_training(tmp_path, dataset_dir=demo_dir, epochs=1, seed=1, overwrite="true")
    assert "Epoch[1] Complete" in replaced.stdout
    assert _hashes(models)["checkpoint_latest.pt"] != before["checkpoint_latest.pt"]
    # the new run's loss log has its own iterations only
    assert [i for _, i, _ in read_losses(tmp_path / "logs" / "train_loss.csv")] == [1, 2, 3, 4]


def test_resume_without_a_training_state_does_not_replace_the_best_model(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"weights")
    with pytest.raises(RunGuardError, match=r"holds model.pt but no training state \(checkpoint_latest.pt\)"):
        TrainingRunGuard(models, resume="true").start()
    guard = TrainingRunGuard(models, overwrite="true")
    guard.start()  # explicitly asked for
    guard.release()
    TrainingRunGuard(tmp_path / "empty" / "models").start()  # nothing to lose: a new training starts


# ----------------------------------------------------------------------------------------------------------------
# 2. two trainings in one bundle_root at once


def test_a_second_training_in_the_same_folder_stops_at_start(demo_dir, tmp_path):
    holder = TrainingRunGuard(tmp_path / "models")  # a training of this folder is running (another process)
    holder.start()
    try:
        second = run_training(tmp_path, expect_ok=False, dataset_dir=demo_dir, epochs=1)
    finally:
        holder.release()
    assert f"another training is running in {tmp_path} (it holds {tmp_path / 'models' / '.training.lock'})" in (
        second.stdout
    )
    assert "use another --bundle_root" in second.stdout
    assert not (tmp_path / "logs" / "train_loss.csv").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".training.lock"]


def test_training_lock_is_taken_once_and_released(tmp_path):
    first = TrainingRunGuard(tmp_path / "models")
    first.start()
    with pytest.raises(RunGuardError, match="another training is running"):
        TrainingRunGuard(tmp_path / "models").start()
    first.release()
    first.release()  # idempotent (finalize after a failure)
    again = TrainingRunGuard(tmp_path / "models")
    again.start()
    again.release()


# ----------------------------------------------------------------------------------------------------------------
# 3. a resumed run is the same run


def _metric_lines(output: str) -> list[str]:
    return re.findall(r"Epoch\[\d+\] Metrics -- .*", output)


def test_killed_and_resumed_training_equals_an_uninterrupted_one(fresh_run, demo_dir, tmp_path):
    """The process dies (``os._exit``: no handler runs) after iteration 7, mid-epoch 2, its last training state
    being that of iteration 6; ``--resume true`` then gives the losses, weights and validation metrics of the
    uninterrupted run bit for bit, and a loss log with each iteration once."""
    fresh_root, fresh_proc = fresh_run
    config = json.loads(TRAIN_CONFIG.read_text())
    crash = "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once=7), lambda e: os._exit(9))"
    overlay = tmp_path.parent / f"{tmp_path.name}_crash.json"
    overlay.write_text(json.dumps({"run": config["run"][:-1] + [crash, config["run"][-1]]}))
    settings = {"dataset_dir": demo_dir, "epochs": EPOCHS, "checkpoint_every_n_iterations": 3}

    crashed = run_training(tmp_path, expect_ok=False, config_files=(TRAIN_CONFIG, overlay), **settings)
    assert crashed.returncode == 9
    state_file = tmp_path / "models" / "checkpoint_latest.pt"
    assert load_state(state_file)["meta"]["iteration"] == 6
    assert [i for _, i, _ in read_losses(tmp_path / "logs" / "train_loss.csv")] == list(range(1, 8))
    # a kill during a save leaves a temporary file; a symbolic link of that name is not the run's own
    stale = tmp_path / "models" / ".checkpoint_latest.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    outside = tmp_path.parent / f"{tmp_path.name}_keep.bin"
    outside.write_bytes(b"not yours")
    link = tmp_path / "models" / ".model.pt.link.tmp"
    link.symlink_to(outside)

    resumed = run_training(tmp_path, resume="true", **settings)
    assert "resumed from" in resumed.stdout and "(iteration 6, 2 of 4 into the next epoch)" in resumed.stdout
    assert f"removed {stale}" in resumed.stdout and not stale.exists()
    assert link.is_symlink() and outside.read_bytes() == b"not yours"

    assert read_losses(tmp_path / "logs" / "train_loss.csv") == read_losses(fresh_root / "logs" / "train_loss.csv")
    final, reference = load_state(state_file), load_state(fresh_root / "models" / "checkpoint_latest.pt")
    assert final["network"].keys() == reference["network"].keys()
    assert all(torch.equal(final["network"][k], reference["network"][k]) for k in reference["network"])
    assert final["evaluator"] == reference["evaluator"]
    assert final["early_stopping"] == reference["early_stopping"]
    # validation metrics of the epochs run after the resume (epochs 2-5) are those of the uninterrupted run
    assert _metric_lines(resumed.stdout) == _metric_lines(fresh_proc.stdout)[1:]


def test_data_loader_state_restores_order_and_augmentation_mid_epoch():
    """Unit level: a loader restored from the state saved after 2 batches serves the batches of the original."""
    from monai.data import Dataset
    from monai.transforms import Compose, RandGaussianNoised

    data = [{"x": torch.full((1, 2), float(i))} for i in range(8)]

    def loader() -> ResumableDataLoader:
        torch.manual_seed(0)
        transform = Compose([RandGaussianNoised(keys="x", prob=1.0, std=1.0)])
        return ResumableDataLoader(Dataset(data, transform), batch_size=2, shuffle=True)

    original = loader()
    first_epoch = list(original)
    iterator = iter(original)
    second_epoch = [next(iterator), next(iterator)]
    saved = torch.load(_roundtrip(original.state_dict()), weights_only=True)  # a checkpoint loads it safely
    second_epoch += list(iterator)
    expected_third = list(original)

    restored = loader()
    restored.load_state_dict(saved)
    rest = list(restored)
    assert len(rest) == 2 and all(torch.equal(a["x"], b["x"]) for a, b in zip(rest, second_epoch[2:]))
    third = list(restored)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(third, expected_third))
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(first_epoch, second_epoch))


def _roundtrip(obj):
    import io

    stream = io.BytesIO()
    torch.save(obj, stream)
    stream.seek(0)
    return stream


def test_only_the_runs_own_temporary_files_are_removed(tmp_path):
    (tmp_path / ".checkpoint_latest.pt.abc.tmp").write_bytes(b"x")
    (tmp_path / ".checkpoint_latest.pt.abc.tmp.keep").write_bytes(b"x")
    (tmp_path / ".other.pt.abc.tmp").write_bytes(b"x")
    (tmp_path / ".model.pt.dir.tmp").mkdir()
    removed = remove_stale_temp_files(tmp_path, ["checkpoint_latest.pt", "model.pt"])
    assert [p.name for p in removed] == [".checkpoint_latest.pt.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".checkpoint_latest.pt.abc.tmp.keep", ".model.pt.dir.tmp", ".other.pt.abc.tmp"
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# 5. empty validation split


def test_empty_validation_split_stops_training_at_start(demo_dir, tmp_path):
    datalist = json.loads((demo_dir / "datalist.json").read_text())
    datalist["validation"] = []
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser.update({**TINY, "image_size": [32, 32], "bundle_root": str(tmp_path), "use_demo_data": False,
                   "datalist": str(path)})  # fmt: skip
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("validate#dataset#data")
    error = _cause(info.value)
    assert isinstance(error, RunGuardError)
    assert str(error).startswith(f"{path}: the 'validation' split has no usable items")
    assert "Add validation items to the datalist" in str(error)


# ----------------------------------------------------------------------------------------------------------------
# 6. unwritable output


def test_unwritable_model_folder_stops_training_at_start(demo_dir, tmp_path):
    (tmp_path / "models").write_text("a file where the model folder should be")
    proc = run_training(tmp_path, expect_ok=False, dataset_dir=demo_dir, epochs=1)
    assert f"RunGuardError: cannot create the output folder {tmp_path / 'models'}" in proc.stdout
    assert "Epoch[1]" not in proc.stdout


def test_unwritable_log_and_eval_folders_are_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunGuardError, match=rf"cannot create the output folder {re.escape(str(blocker / 'logs'))}"):
        TrainingRunGuard(tmp_path / "models", output_dirs=[blocker / "logs"]).start()
    assert not (tmp_path / "models" / ".training.lock").exists()  # no lock is left behind

    parser = ConfigParser()
    parser.read_config([str(TRAIN_CONFIG), str(EVALUATE_CONFIG)])
    parser.update({"bundle_root": str(tmp_path), "output_dir": str(blocker / "eval")})
    guard = parser.get_parsed_content("run_guard")
    assert type(guard) is OutputGuard  # evaluation checks its output and takes no training lock
    with pytest.raises(RunGuardError, match=rf"cannot create the output folder {re.escape(str(blocker / 'eval'))}"):
        guard.start()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_named(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(RunGuardError, match=rf"cannot write to the output folder {re.escape(str(folder))}"):
            OutputGuard([folder]).start()
    finally:
        folder.chmod(0o755)
