"""End-to-end tests of bundle/configs/train.json through the real ``python -m monai.bundle run training`` command.

A tiny configuration (``test_convnext`` image encoder, 4 attention heads, 24 demo cases of 64 pixels, batch 4,
32-pixel network input: 4 iterations per epoch) keeps each run short; the runs are processes forked from a
pre-imported forkserver (see :py:class:`BundleRun`). Two identical fresh 5-epoch runs are shared (session fixture)
by the end-to-end, determinism and checkpoint-loading tests here and in ``test_reliability.py`` (resume).
"""

from __future__ import annotations

import json

import csv
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest
import torch

from himix_monai.demo.slices import ensure_demo_dataset

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


def bundle_argv(bundle_root: Path, config_files: tuple = (TRAIN_CONFIG,), **overrides) -> list[str]:
    """The arguments of ``python -m monai.bundle`` for ``run training`` with the tiny settings and ``overrides``;
    ``config_files`` are merged left to right (default: ``train.json``)."""
    settings = {**TINY, "bundle_root": str(bundle_root), **overrides}
    files = [str(f) for f in config_files]
    argv = ["run", "training", "--config_file", files[0] if len(files) == 1 else str(files)]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    return argv


# Most of a tiny run on this shared machine was Python start-up and imports (torch, transformers, timm: ~8 s of
# CPU per run). The runs are therefore forked from a ``forkserver`` that has imported them once; each run is still
# a process of its own (killed with SIGKILL, exit status, its own logging), given exactly the arguments of the
# command line and dispatched by ``fire`` to ``monai.bundle``'s ``run``, as ``python -m monai.bundle`` does.
_PRELOAD = [
    "torch",
    "transformers",
    "timm",
    "ignite.engine",
    "fire",
    "monai.bundle.scripts",
    "monai.engines",
    "monai.handlers",
    "himix_monai.networks",
    "himix_monai.transforms",
    "himix_monai.inferers",
    "himix_monai.checkpoints",
    "himix_monai.config_utils",
    "himix_monai.handlers",
    "himix_monai.demo.slices",
    "tests.test_training_bundle",
]
_CONTEXT: list = []


def _forkserver():
    if not _CONTEXT:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        _CONTEXT.append(context)
    return _CONTEXT[0]


def _bundle_main(argv: list[str], log: str) -> None:
    """In the child: ``python -m monai.bundle <argv>`` with stdout and stderr to ``log``, offline, one thread."""
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    os.chdir(REPO)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)  # several OpenMP threads per run were 10x slower on the shared 2-core machine
    import fire
    from monai.bundle import scripts

    fire.Fire({"run": scripts.run}, command=argv, name="monai.bundle")


class BundleRun:
    """One ``python -m monai.bundle run training ...`` process.

    Args:
        bundle_root: the bundle root of the run (its log is ``bundle_root.log`` next to it).
        overrides: config overrides, as on the command line.
    """

    def __init__(self, bundle_root: Path, **overrides) -> None:
        self.argv = bundle_argv(bundle_root, **overrides)
        self.log = Path(f"{bundle_root}.log")
        self.process = _forkserver().Process(target=_bundle_main, args=(self.argv, str(self.log)), daemon=True)
        self.process.start()

    @property
    def command(self) -> str:
        return " ".join(["python -m monai.bundle", *self.argv])

    def kill(self) -> None:
        """SIGKILL: no handler of the run gets to do anything."""
        self.process.kill()
        self.process.join()

    def wait(self, timeout: float = 900) -> subprocess.CompletedProcess:
        """Wait for the end; ``stdout`` is the run's output (stdout and stderr)."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
            pytest.fail(f"timed out after {timeout} s: {self.command}")
        return subprocess.CompletedProcess(self.command, self.process.exitcode, self.log.read_text(errors="replace"))


def run_trainings(*runs: tuple[Path, dict], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Run several trainings side by side, ``runs`` being ``(bundle_root, overrides)`` pairs; the exit status is not
    checked."""
    started = [BundleRun(root, **overrides) for root, overrides in runs]
    return [run.wait(timeout) for run in started]


def check_exit(proc: subprocess.CompletedProcess, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Fail the test, with the output's tail, on an unexpected exit status."""
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{proc.args} failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    if not expect_ok and proc.returncode == 0:
        pytest.fail(f"{proc.args} was expected to fail but exited with 0:\n{proc.stdout[-3000:]}")
    return proc


def run_training(bundle_root: Path, expect_ok: bool = True, **overrides) -> subprocess.CompletedProcess:
    """Run the bundle's ``training``; fails the test on an unexpected exit status."""
    return check_exit(run_trainings((bundle_root, overrides))[0], expect_ok)


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
def fresh_runs(tmp_path_factory, demo_dir) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Two identical, complete, uninterrupted 5-epoch training runs (run side by side, once per session, also when
    another test module imports this fixture): their bundle roots and process results."""
    if "fresh_runs" not in _SHARED:
        roots = [tmp_path_factory.mktemp("fresh"), tmp_path_factory.mktemp("twin")]
        procs = run_trainings(*[(root, {"dataset_dir": demo_dir, "epochs": EPOCHS}) for root in roots])
        _SHARED["fresh_runs"] = [(root, check_exit(proc)) for root, proc in zip(roots, procs)]
    return _SHARED["fresh_runs"]


@pytest.fixture(scope="session")
def fresh_run(fresh_runs) -> tuple[Path, subprocess.CompletedProcess]:
    """The first of the two fresh runs."""
    return fresh_runs[0]


def test_training_writes_best_model_latest_state_and_loss_log(fresh_run):
    root, proc = fresh_run
    models = root / "models"
    assert (models / "model.pt").is_file()
    # no temp files left; the training lock's file stays (the lock is released: filelock keeps its file)
    assert sorted(p.name for p in models.iterdir()) == [".training.lock", "checkpoint_latest.pt", "model.pt"]

    state = load_state(models / "checkpoint_latest.pt")  # plain state dicts: loads with weights_only=True
    meta = state["meta"]
    assert (meta["epoch"], meta["iteration"], meta["epoch_length"]) == (EPOCHS, 4 * EPOCHS, 4)
    assert dict(state["trainer"]) == {"epoch_length": 4, "iteration": 4 * EPOCHS, "max_epochs": EPOCHS}
    assert set(state["early_stopping"]) >= {"counter", "best_score"}
    assert state["evaluator"]["best_metric_epoch"] >= 1
    assert len(state["best_model_saver"]["_saved"]) == 1  # (score, name) of the best model, written as model.pt
    assert state["lr_scheduler"]["last_epoch"] == EPOCHS
    # the frozen text encoder is left out, only its fingerprint is kept; the trained weights are all there
    assert [k for k in state["network"] if k.startswith("text_encoder.")] == ["text_encoder._extra_state"]
    assert "image_encoder.backbone.stem_0.weight" in state["network"]
    assert set(meta["network_signature"]["num_heads"].values()) == {4}

    losses = read_losses(root / "logs" / "train_loss.csv")
    assert [(e, i) for e, i, _ in losses] == [(1 + (i - 1) // 4, i) for i in range(1, 4 * EPOCHS + 1)]
    assert "saved the training state at epoch 5, iteration 20" in proc.stdout
    assert "PILReader: unable to load" not in proc.stdout  # reader fall-through noise is silenced


def test_two_runs_with_the_same_seed_give_the_same_losses(fresh_runs):
    """Determinism on CPU: the first 20 per-iteration losses of two runs are bitwise equal."""
    (root, _), (twin, _) = fresh_runs
    first = read_losses(root / "logs" / "train_loss.csv")[:20]
    second = read_losses(twin / "logs" / "train_loss.csv")[:20]
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
        assert workflow.max_epochs == json.loads(TRAIN_CONFIG.read_text())["epochs"]
        assert workflow.train_inferer is workflow.val_inferer
    finally:
        workflow.finalize()


def test_cli_booleans_given_as_text(tmp_path):
    """``--resume false`` arrives as the string "false": the bundle's settings read it as False."""
    from himix_monai.config_utils import as_bool
    from himix_monai.handlers import TrainingStateCheckpoint

    assert [as_bool(v) for v in ("true", "True", "1", "yes", 1, True)] == [True] * 6
    assert [as_bool(v) for v in ("false", "False", "0", "no", 0, False, None)] == [False] * 7
    with pytest.raises(ValueError, match="resume must be true or false, got 'maybe'"):
        as_bool("maybe", "resume")
    objects = {"net": torch.nn.Linear(1, 1)}
    assert TrainingStateCheckpoint(tmp_path / "state.pt", objects, resume="false").resume is False
    assert TrainingStateCheckpoint(tmp_path / "state.pt", objects, resume="true").resume is True


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_bundle_text_tokens_and_encoder_levels_reach_the_network(tiny_text_model_dir, config):
    """``text_tokens`` and ``image_encoder_out_indices`` are bundle keys: a five-level encoder with one decoder
    stage per level is configured from the command line alone (``--text_tokens [6,4,3,2]``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / config))
    assert parser["text_tokens"] == [24, 12, 9] and parser["image_encoder_out_indices"] is None
    parser.update({"text_encoder": tiny_text_model_dir, "max_text_length": 8, "image_encoder": "resnet18",
                   "in_channels": 3, "text_tokens": [6, 4, 3, 2], "image_encoder_out_indices": [0, 1, 2, 3, 4]})
    net = parser.get_parsed_content("network_def")
    assert net.image_encoder.reductions == [2, 4, 8, 16, 32]
    assert [stage.text_projection.token_projection.out_channels for stage in net.stages] == [6, 4, 3, 2]


def test_kvasir_cpu_preset_builds_its_network():
    """``datasets/kvasir_cpu.json`` merged after ``train.json``: RGB resnet18 (strides 4-32), offline MiniLM text,
    bf16, real data (no demo), report-aware flips off (they did not help over three seeds) but wired in, and an image
    size the encoder accepts."""
    from monai.bundle import ConfigParser

    from himix_monai.config_utils import check_image_size
    from himix_monai.transforms.flip import HORIZONTAL_WORDS, VERTICAL_WORDS

    parser = ConfigParser()
    parser.read_config([str(TRAIN_CONFIG), str(REPO / "bundle" / "configs" / "datasets" / "kvasir_cpu.json")])
    assert parser["use_demo_data"] is False and parser["precision"] == "bf16" and parser["in_channels"] == 3
    flips = parser.get_parsed_content("train#augmentation")[-2:]
    assert [(flip.prob, flip.word_pairs) for flip in flips] == [(0.0, HORIZONTAL_WORDS), (0.0, VERTICAL_WORDS)]
    net = parser.get_parsed_content("network_def")
    assert net.image_encoder.reductions == [4, 8, 16, 32] and len(net.stages) == 3
    assert net.text_encoder is not None and net.text_encoder.num_layers == 6  # MiniLM-L6
    check_image_size(parser["image_size"], net)
