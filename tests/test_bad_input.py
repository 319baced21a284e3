"""Bad input -> clear behaviour (issue 12, rows 4, 7, 8, 9, 10, 11): empty masks, NaN/inf images, unreadable
reports, the command-line message, small setting errors and corrupt files in converters.

Each test failed before its fix. Tiny fixtures made in ``tmp_path``; no bundle training run (the command-line
test starts ``python -m monai.bundle`` once and stops at a bad datalist).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged

from himix_monai.data.datalist import DatalistError, load_checked_datalist
from himix_monai.errors import HiMixError, NonFiniteImageError, SettingError, find_project_error
from himix_monai.transforms import BinarizeMaskd, EnsureFinited
from himix_monai.handlers import SegmentationMetricsSaver

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TRAIN, EVALUATE, INFERENCE = (str(CONFIGS / name) for name in ("train.json", "evaluate.json", "inference.json"))
TEXT = "Unilateral pulmonary infection, one infected area, upper left lung."


def _png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _config(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(list(files))
    parser.update(overrides)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# row 4: empty masks follow MONAI's ignore_empty=False convention, counted honestly


def _mask_items(folder: Path, cases: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Items whose image is the prediction (an identity network thresholds it) and whose label is the mask."""
    items = []
    for index, (pred, label) in enumerate(cases):
        items.append(
            {
                "image": _png(folder / f"img_{index}.png", pred.astype(np.uint8) * 255),
                "label": _png(folder / f"mask_{index}.png", label.astype(np.uint8) * 255),
            }
        )
    return items


def _bundle_metric_evaluator(items: list[dict], config: ConfigParser, handlers: list) -> SupervisedEvaluator:
    """A CPU evaluator with the bundle's own metric handlers; the 'network' turns the image into logits."""
    load = Compose(
        [
            LoadImaged(["image", "label"], image_only=True, reader="PILReader", reverse_indexing=False),
            EnsureChannelFirstd(["image", "label"]),
            ScaleIntensityRanged("image", a_min=0, a_max=255, b_min=0, b_max=1),
            BinarizeMaskd("label"),
        ]
    )
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items, load), batch_size=2),
        network=lambda image: (image - 0.5) * 20,
        postprocessing=config.get_parsed_content("validate#postprocessing"),
        key_val_metric=config.get_parsed_content("validate#key_metric"),
        additional_metrics=config.get_parsed_content("validate#additional_metrics"),
        val_handlers=handlers,
    )


def test_validation_of_empty_masks_with_empty_predictions_scores_one(tmp_path):
    """Was 0.0 every epoch (MONAI's MeanDice scores an empty mask NaN and averages no value to 0)."""
    empty = np.zeros((8, 8), bool)
    evaluator = _bundle_metric_evaluator(_mask_items(tmp_path, [(empty, empty)] * 3), _config(TRAIN), [])
    evaluator.run()
    assert evaluator.state.metrics["val_mean_dice"] == pytest.approx(1.0)
    assert evaluator.state.metrics["val_mean_iou"] == pytest.approx(1.0)


def test_evaluation_scores_empty_masks_by_monai_convention_and_counts_every_image(tmp_path, caplog):
    """Empty vs empty = 1, false positive on an empty mask = 0 (was NaN for both, left out of a mean that the log
    said was 'over 3 images')."""
    empty = np.zeros((8, 8), bool)
    lesion = empty.copy()
    lesion[2:6, 2:6] = True
    cases = [(empty, empty), (lesion, empty), (lesion, lesion)]
    writer = SegmentationMetricsSaver(tmp_path / "eval")
    config = _config(TRAIN, EVALUATE)
    evaluator = _bundle_metric_evaluator(_mask_items(tmp_path, cases), config, [writer])
    with caplog.at_level(logging.INFO, logger="himix_monai.handlers"):
        evaluator.run()
    with open(tmp_path / "eval" / "per_image_metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [float(row["dice"]) for row in rows] == [1.0, 0.0, 1.0]
    assert [float(row["iou"]) for row in rows] == [1.0, 0.0, 1.0]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_images"] == summary["n_scored"] == 3
    assert summary["dice_mean"] == pytest.approx(2 / 3) and summary["iou_mean"] == pytest.approx(2 / 3)
    assert any("(mean ± std over 3 images)" in record.getMessage() for record in caplog.records)


def test_metrics_writer_counts_only_the_images_that_entered_the_mean(tmp_path, caplog):
    """With a NaN-scoring metric (ignore_empty=True) the log counts the scored rows and names the others."""
    from monai.handlers import MeanDice, from_engine

    empty = np.zeros((8, 8), bool)
    lesion = empty.copy()
    lesion[2:6, 2:6] = True
    items = _mask_items(tmp_path, [(empty, empty), (lesion, lesion)])
    config = _config(TRAIN)
    config["validate"]["key_metric"] = {"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]))}
    config["validate"]["additional_metrics"] = {}
    writer = SegmentationMetricsSaver(tmp_path / "eval", iou_metric=None, global_dice_metric=None, global_iou_metric=None)
    with caplog.at_level(logging.INFO, logger="himix_monai.handlers"):
        _bundle_metric_evaluator(items, config, [writer]).run()
    assert writer.summary["n_images"] == 2 and writer.summary["n_scored"] == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("over 1 images" in message for message in messages)
    assert any("1 of 2 images have no score" in message and "img_0.png" in message for message in messages)


# ---------------------------------------------------------------------------------------------------------------
# row 9: from the command line, the project's own message is the last thing printed


def test_bundle_command_prints_the_project_message_last(tmp_path):
    """Was ``RuntimeError: Failed to evaluate ConfigExpression ...`` under a long traceback."""
    datalist = tmp_path / "datalist.json"
    missing = tmp_path / "missing.png"
    items = [{"image": str(missing), "label": str(tmp_path / "missing_mask.png"), "text": TEXT}]
    datalist.write_text(json.dumps({"training": items, "validation": []}))
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    settings = {
        "bundle_root": tmp_path / "root",
        "use_demo_data": False,
        "datalist": datalist,
        "image_encoder": "test_convnext",
        "network_def#num_heads": 4,
        "image_size": "[32,32]",
    }
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 1
    lines = proc.stderr.rstrip().splitlines()
    assert "Traceback (most recent call last)" in proc.stderr  # the full traceback is still there, first
    tail = "\n".join(lines[-3:])
    assert lines[-3].startswith(f"error: {datalist}: 1 of 1 'training' items cannot be used (missing image: 1)")
    assert f"item 1: missing image: {missing} not found" in tail
    assert lines[-1].startswith("Fix or remove them") and "--skip_bad_items true" in lines[-1]


def test_library_use_keeps_normal_exceptions():
    """Outside ``python -m monai.bundle`` (MONAI Label, notebooks, ConfigWorkflow, pytest) nothing is installed."""
    hook = sys.excepthook
    config = _config(TRAIN)
    index = next(i for i, expr in enumerate(config["initialize"]) if "install_command_line_excepthook" in expr)
    installed = config.get_parsed_content(f"initialize#{index}")
    assert installed is False and sys.excepthook is hook


def test_command_line_hook_finds_the_project_error_behind_monai_wrapper(capsys, monkeypatch):
    from himix_monai.errors import install_command_line_excepthook

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args))
    assert install_command_line_excepthook(force=True) and install_command_line_excepthook(force=True)
    try:
        try:
            raise DatalistError("d.json: item 3 of 'training': 'text' must be a non-empty string")
        except DatalistError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from err
    except RuntimeError as err:
        wrapped = err
    sys.excepthook(RuntimeError, wrapped, wrapped.__traceback__)
    assert len(seen) == 1  # the previous hook printed the traceback, once
    assert capsys.readouterr().err.rstrip().splitlines()[-1] == (
        "error: d.json: item 3 of 'training': 'text' must be a non-empty string"
    )
    sys.excepthook(ValueError, ValueError("not ours"), None)
    assert capsys.readouterr().err == ""  # other errors: only the normal traceback
    assert find_project_error(RuntimeError("plain")) is None


def test_project_errors_share_one_base_class():
    from himix_monai.checkpoints import CheckpointError
    from himix_monai.data.ct import CTReadError
    from himix_monai.data.inference_items import InferenceInputError
    from himix_monai.handlers import NonFiniteLossError

    for kind in (DatalistError, CheckpointError, NonFiniteLossError, CTReadError, InferenceInputError, SettingError):
        assert issubclass(kind, HiMixError), kind
    assert issubclass(DatalistError, ValueError) and issubclass(CheckpointError, RuntimeError)  # as before


# ---------------------------------------------------------------------------------------------------------------
# row 10: small ones


@pytest.mark.parametrize("config_file", [TRAIN, INFERENCE])
def test_image_size_64_is_a_square(config_file, tmp_path):
    """Was a bare ``TypeError: 'int' object is not iterable`` (and MONAI's Resized refuses one size)."""
    config = _config(config_file, image_size=64, image_encoder="test_convnext", bundle_root=str(tmp_path))
    config["network_def"]["num_heads"] = 4
    check = next(i for i, expr in enumerate(config["initialize"]) if "check_image_size" in expr)
    config.get_parsed_content(f"initialize#{check}")  # no error
    transforms = config.get_parsed_content("validate#preprocessing" if config_file == TRAIN else "preprocessing")
    resize = next(t for t in transforms.transforms if type(t).__name__ == "Resized")
    assert list(resize.resizer.spatial_size) == [64, 64]


def test_image_size_of_wrong_form_is_named(tmp_path):
    config = _config(TRAIN, image_size=[64], bundle_root=str(tmp_path))
    with pytest.raises(Exception) as info:
        config.get_parsed_content("validate#preprocessing")
    error = find_project_error(info.value)
    assert isinstance(error, SettingError) and "image_size must be one positive size" in str(error)


def _datalist(tmp_path: Path, items: list[dict], split: str = "test") -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({split: items}))
    return path


def _good_item(tmp_path: Path, name: str, text: str = TEXT) -> dict:
    rng = np.random.default_rng(0)
    image = _png(tmp_path / f"{name}.png", (rng.random((32, 32)) * 255).astype(np.uint8))
    mask = _png(tmp_path / f"{name}_mask.png", np.zeros((32, 32), np.uint8))
    return {"image": image, "label": mask, "text": text}


def test_evaluate_honours_skip_bad_items(tmp_path):
    """evaluate.json passed skip_bad_items=False whatever the setting, while the error message suggested it."""
    items = [_good_item(tmp_path, "good"), {**_good_item(tmp_path, "bad"), "image": str(tmp_path / "gone.png")}]
    path = _datalist(tmp_path, items)
    config = _config(TRAIN, EVALUATE, use_demo_data=False, datalist=str(path), skip_bad_items=True)
    data = config.get_parsed_content("validate#dataset#data")
    assert [Path(item["image"]).name for item in data] == ["good.png"]
    config = _config(TRAIN, EVALUATE, use_demo_data=False, datalist=str(path))
    with pytest.raises(Exception) as info:
        config.get_parsed_content("validate#dataset#data")
    assert "set skip_bad_items to true" in str(find_project_error(info.value))


def test_empty_text_is_skipped_with_skip_bad_items(tmp_path, caplog):
    items = [_good_item(tmp_path, "good"), _good_item(tmp_path, "blank", text="   ")]
    path = _datalist(tmp_path, items, split="training")
    with pytest.raises(DatalistError, match=r"item 2 of 'training': 'text' must be a non-empty string"):
        load_checked_datalist(path, "training")
    with caplog.at_level(logging.WARNING, logger="himix_monai.data.datalist"):
        data = load_checked_datalist(path, "training", skip_bad_items="true")
    assert [Path(item["image"]).name for item in data] == ["good.png"]
    assert any(
        f"{path}: skipped item 2 of 'training': empty text (image {items[1]['image']})" in r.getMessage()
        for r in caplog.records
    )


# ---------------------------------------------------------------------------------------------------------------
# row 7: NaN or inf in an input image


def _float_tiff(path: Path, bad: float) -> str:
    pixels = np.random.default_rng(0).random((32, 32)).astype(np.float32) * 255
    pixels[3, 4] = bad
    Image.fromarray(pixels, mode="F").save(path)
    return str(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_image_is_named_at_start_or_skipped(tmp_path, bad, caplog):
    """Training stopped at a NaN loss without naming the image; evaluation gave Dice 0 with exit status 0."""
    item = {**_good_item(tmp_path, "good"), "image": _float_tiff(tmp_path / "nan.tif", bad)}
    path = _datalist(tmp_path, [_good_item(tmp_path, "good"), item], split="training")
    with pytest.raises(DatalistError) as info:
        load_checked_datalist(path, "training")
    message = str(info.value)
    assert "NaN or infinite values in image: 1" in message and f"{item['image']}: " in message
    assert "set skip_bad_items to true" in message
    with caplog.at_level(logging.WARNING, logger="himix_monai.data.datalist"):
        assert len(load_checked_datalist(path, "training", skip_bad_items=True)) == 1
    assert any(item["image"] in r.getMessage() and "NaN or infinite" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("config_file", [TRAIN, INFERENCE])
def test_preprocessing_names_a_non_finite_image(tmp_path, config_file):
    """Without the start-up check (check_data_files false, inference) the preprocessing stops, naming the file."""
    item = {**_good_item(tmp_path, "good"), "image": _float_tiff(tmp_path / "nan.tif", float("nan"))}
    config = _config(config_file, bundle_root=str(tmp_path), image_size=[32, 32])
    preprocessing = config.get_parsed_content("validate#preprocessing" if config_file == TRAIN else "preprocessing")
    with pytest.raises(Exception) as info:
        preprocessing(dict(item))
    error = find_project_error(info.value)
    assert isinstance(error, NonFiniteImageError)
    assert str(error).startswith(f"{item['image']}: the image has 1 NaN and 0 infinite values")
    assert EnsureFinited("image")({"image": torch.zeros(1, 2, 2)})["image"].shape == (1, 2, 2)


# ---------------------------------------------------------------------------------------------------------------
# row 8: reports the text encoder cannot read


def test_unreadable_report_warns_once_per_item(tiny_text_model_dir, caplog):
    """A Chinese or emoji report became almost all [UNK] with no message."""
    from himix_monai.transforms import TokenizeTextd

    tokenize = TokenizeTextd("text", tiny_text_model_dir, max_length=24)
    items = [
        {"image": "chinese.png", "text": "双肺感染，两个感染区域，左上肺。"},
        {"image": "emoji.png", "text": "🦠🦠 😷 🫁🫁"},
        {"image": "english.png", "text": "Bilateral pulmonary infection, two infected areas."},
    ]
    with caplog.at_level(logging.WARNING, logger="himix_monai.transforms.text"):
        for _ in range(2):  # two epochs
            for item in items:
                tokenize(item)
    warnings = [r.getMessage() for r in caplog.records if "mostly unreadable" in r.getMessage()]
    assert len(warnings) == 2
    assert "'the item with image chinese.png'" in warnings[0] and "tokens are [UNK]" in warnings[0]
    assert "'the item with image emoji.png'" in warnings[1]
    assert all("english" not in warning for warning in warnings)


# ---------------------------------------------------------------------------------------------------------------
# row 11: converters check that every file they list can be opened

CORRUPT_JPEG = b"\xff\xd8\xff" + b"garbage" * 20


def test_lvit_skips_a_corrupt_jpeg_and_strict_fails(tmp_path, capsys):
    """The issue's case: one LViT image is ``\\xff\\xd8\\xff`` and garbage."""
    from data_prep import lvit
    from tests.test_converters import make_lvit

    dataset = make_lvit(tmp_path / "data")
    dataset.images[1].write_bytes(CORRUPT_JPEG)
    out = tmp_path / "d.json"
    for extra in ([], ["--no-verify"]):  # the header check alone finds it
        assert lvit.main(["--root", str(dataset.root), "--out", str(out), "--no-progress", *extra]) == 0
        captured = capsys.readouterr()
        expected = f"{dataset.location(1)} ('{dataset.records[1][0]}'): unreadable image: {dataset.images[1]}"
        assert expected in captured.err
        assert str(dataset.images[1]) not in out.read_text()
    out.unlink()
    assert lvit.main(["--root", str(dataset.root), "--out", str(out), "--no-progress", "--strict"]) == 1
    assert "unreadable image" in capsys.readouterr().err and not out.exists()


def test_reports_converter_checks_the_files_it_lists(tmp_path, capsys):
    """``data_prep.reports --datalist`` wrote items whose image it never opened, and stopped on the first corrupt
    mask; now it checks each image and mask, skips and names a bad one, and stops under --strict."""
    from data_prep.reports import main as reports_main

    good = _good_item(tmp_path, "good", text="")
    corrupt_image = {**_good_item(tmp_path, "other", text="kept"), "image": str(tmp_path / "corrupt.jpg")}
    (tmp_path / "corrupt.jpg").write_bytes(CORRUPT_JPEG)
    corrupt_mask = {**_good_item(tmp_path, "third", text=""), "label": str(tmp_path / "corrupt_mask.png")}
    (tmp_path / "corrupt_mask.png").write_bytes(CORRUPT_JPEG)
    source = tmp_path / "in.json"
    source.write_text(json.dumps({"training": [good, corrupt_image], "test": [corrupt_mask]}))
    out = tmp_path / "out.json"
    assert reports_main(["--datalist", str(source), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    expected = f"entry 2 of {source} ('training: corrupt.jpg'): unreadable image: {tmp_path / 'corrupt.jpg'}"
    assert expected in captured.err
    assert f"entry 1 of {source} ('test: third.png'): unreadable mask: {tmp_path / 'corrupt_mask.png'}" in captured.err
    assert "skipped 2 (unreadable image: 1, unreadable mask: 1)" in captured.out
    result = json.loads(out.read_text())
    assert [Path(item["image"]).name for item in result["training"]] == ["good.png"] and result["test"] == []
    old = out.read_text()
    assert reports_main(["--datalist", str(source), "--out", str(out), "--strict", "--overwrite-text"]) == 1
    assert "corrupt.jpg" in capsys.readouterr().err and out.read_text() == old

    masks = tmp_path / "masks"
    masks.mkdir()
    _png(masks / "a.png", np.zeros((16, 16), np.uint8))
    (masks / "b.png").write_bytes(CORRUPT_JPEG)
    csv_out = tmp_path / "text.csv"
    assert reports_main(["--masks", str(masks), "--out", str(csv_out)]) == 0
    captured = capsys.readouterr()
    assert "('b.png'): unreadable mask" in captured.err and "1 reports" in captured.out
    assert reports_main(["--masks", str(masks), "--out", str(tmp_path / "strict.csv"), "--strict"]) == 1
    assert not (tmp_path / "strict.csv").exists()


def test_inference_skips_a_non_finite_image_with_skip_bad_items(tmp_path, caplog):
    """Inference gave an empty mask for a NaN image, exit status 0; now it stops naming it, or skips it."""
    nan_image = _float_tiff(tmp_path / "nan.tif", float("nan"))
    items = [_good_item(tmp_path, "good"), {"image": nan_image, "text": TEXT}]
    path = _datalist(tmp_path, items)
    config = _config(INFERENCE, bundle_root=str(tmp_path), input_datalist=str(path))
    assert len(config.get_parsed_content("image_items")) == 2  # default: read later, stops at the NaN image
    config = _config(INFERENCE, bundle_root=str(tmp_path), input_datalist=str(path), skip_bad_items="true")
    with caplog.at_level(logging.WARNING, logger="himix_monai.data.datalist"):
        kept = config.get_parsed_content("image_items")
    assert [Path(item["image"]).name for item in kept] == ["good.png"]
    messages = [record.getMessage() for record in caplog.records]
    assert any(f"skipped {nan_image} (skip_bad_items)" in message and "NaN" in message for message in messages)
