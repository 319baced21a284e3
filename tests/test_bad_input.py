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
from himix_monai.visualize import PerImageMetricsWriter

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
    writer = PerImageMetricsWriter(tmp_path / "eval")
    config = _config(TRAIN, EVALUATE)
    evaluator = _bundle_metric_evaluator(_mask_items(tmp_path, cases), config, [writer])
    with caplog.at_level(logging.INFO, logger="himix_monai.visualize"):
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
    writer = PerImageMetricsWriter(tmp_path / "eval", iou_metric=None, global_dice_metric=None, global_iou_metric=None)
    with caplog.at_level(logging.INFO, logger="himix_monai.visualize"):
        _bundle_metric_evaluator(items, config, [writer]).run()
    assert writer.summary["n_images"] == 2 and writer.summary["n_scored"] == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("over 1 images" in message for message in messages)
    assert any("1 of 2 images have no score" in message and "img_0.png" in message for message in messages)
