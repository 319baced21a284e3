"""Tests of himix_monai.visualize: overlays, the overlay saver and the per-image metrics writer."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import ConfusionMatrix, MeanDice, MeanIoUHandler, from_engine
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    ScaleIntensityRanged,
)

from himix_monai.transforms.mask import BinarizeMaskd
from himix_monai.handlers import SegmentationMetricsSaver
from himix_monai.visualize import (
    FALSE_NEGATIVE_COLOR,
    FALSE_POSITIVE_COLOR,
    PREDICTION_COLOR,
    TRUE_POSITIVE_COLOR,
    OverlaySaver,
    overlay_prediction,
    save_overlay,
)

YELLOW, RED, GREEN = (255, 255, 0), (255, 0, 0), (0, 255, 0)


def _case():
    """2x2 image 0..30 with one TP (0,0), FN (0,1), FP (1,0), TN (1,1) pixel."""
    image = np.array([[[0.0, 10.0], [20.0, 30.0]]])
    pred = np.array([[[1, 0], [1, 0]]])
    label = np.array([[[1, 1], [0, 0]]])
    return image, pred, label


def test_paper_colours():
    assert (TRUE_POSITIVE_COLOR, FALSE_NEGATIVE_COLOR, FALSE_POSITIVE_COLOR) == (YELLOW, RED, GREEN)


def test_overlay_colours_exact_without_blending():
    image, pred, label = _case()
    rgb = overlay_prediction(image, pred, label, alpha=1.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert tuple(rgb[0, 0]) == YELLOW  # true positive
    assert tuple(rgb[0, 1]) == RED  # false negative
    assert tuple(rgb[1, 0]) == GREEN  # false positive
    assert tuple(rgb[1, 1]) == (255, 255, 255)  # true negative: grey, normalised max -> 255


def test_overlay_blending_and_normalisation():
    image, pred, label = _case()
    rgb = overlay_prediction(torch.as_tensor(image), torch.as_tensor(pred), torch.as_tensor(label), alpha=0.5)
    # grey levels after per-image min-max: 0, 85, 170, 255
    assert tuple(rgb[0, 0]) == (128, 128, 0)  # 0.5 * 0 + 0.5 * yellow, rounded half to even -> 128
    assert tuple(rgb[0, 1]) == (170, 42, 42)  # 0.5 * 85 + 0.5 * red = 170, 42.5 -> 42
    assert tuple(rgb[1, 0]) == (85, 212, 85)  # 0.5 * 170 + 0.5 * green
    assert tuple(rgb[1, 1]) == (255, 255, 255)


def test_overlay_alpha_zero_is_the_grey_image():
    image, pred, label = _case()
    rgb = overlay_prediction(image[0], pred[0], label[0], alpha=0.0)
    assert rgb[..., 0].tolist() == [[0, 85], [170, 255]]
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_rgb_image_uses_luminance_and_constant_image_is_black():
    rgb_image = np.zeros((3, 1, 2))
    rgb_image[1, 0, 1] = 1.0  # pure green pixel is brighter than black
    out = overlay_prediction(rgb_image, np.zeros((1, 2)), np.zeros((1, 2)))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [255, 255, 255]
    flat = overlay_prediction(np.full((1, 2, 2), 7.0), np.zeros((2, 2)), np.zeros((2, 2)))
    assert flat.max() == 0


def test_prediction_only_overlay_fill_and_outline():
    image = np.zeros((1, 5, 5))
    pred = np.zeros((1, 5, 5))
    pred[0, 1:4, 1:4] = 1
    rgb = overlay_prediction(image, pred, None, alpha=0.5)
    assert tuple(rgb[2, 2]) == tuple(round(0.5 * c) for c in PREDICTION_COLOR)  # inside: blended fill
    assert tuple(rgb[1, 1]) == PREDICTION_COLOR  # boundary: full colour
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    filled = overlay_prediction(image, pred, None, alpha=0.5, outline=False)
    assert tuple(filled[1, 1]) == tuple(filled[2, 2])


def test_shape_checks():
    with pytest.raises(ValueError, match="pred shape"):
        overlay_prediction(np.zeros((4, 4)), np.zeros((3, 3)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="single-channel"):
        overlay_prediction(np.zeros((4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="alpha"):
        overlay_prediction(np.zeros((4, 4)), np.zeros((4, 4)), alpha=2)


def test_save_overlay_png_and_transpose(tmp_path):
    image, pred, label = _case()
    written = save_overlay(tmp_path / "sub" / "x.png", image, pred, label, alpha=1.0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "x.png").convert("RGB")), written)
    save_overlay(tmp_path / "t.png", image, pred, label, alpha=1.0, transpose=True)
    transposed = np.asarray(Image.open(tmp_path / "t.png").convert("RGB"))
    assert tuple(transposed[1, 0]) == RED and tuple(transposed[0, 1]) == GREEN


# --- handlers on a real SupervisedEvaluator -------------------------------------------------------------
#
# The "network" is a 1x1 conv with logits = 10 * image - 5, so the binary prediction equals the image.
# Three 4x4 items, batch size 2 (two iterations):
#   a: label rows 0-1 (8 px), pred the same            -> TP 8            dice 1,   IoU 1
#   b: label (2,0),(2,1), pred (2,1),(2,2)             -> TP 1, FP 1, FN 1 dice 1/2, IoU 1/3
#   c: label row 3 (4 px), empty pred                  -> FN 4            dice 0,   IoU 0
# mean dice 1/2 (std 0.408248), mean IoU 4/9; global over all pixels: TP 9, FP 1, FN 5 ->
# dice 18/24 = 0.75, IoU 9/15 = 0.6.


def _write_items(tmp_path):
    preds = np.zeros((3, 4, 4), dtype=np.uint8)
    labels = np.zeros((3, 4, 4), dtype=np.uint8)
    preds[0, :2], labels[0, :2] = 255, 255
    preds[1, 2, 1:3], labels[1, 2, :2] = 255, 255
    labels[2, 3] = 255
    items = []
    for name, pred, label in zip("abc", preds, labels, strict=True):
        image_path, label_path = tmp_path / f"img_{name}.png", tmp_path / f"mask_{name}.png"
        Image.fromarray(pred).save(image_path)
        Image.fromarray(label).save(label_path)
        items.append({"image": str(image_path), "label": str(label_path)})
    return items


def _evaluator(tmp_path, handlers):
    load = Compose(
        [
            LoadImaged(["image", "label"], image_only=True, reader="PILReader", reverse_indexing=False),
            EnsureChannelFirstd(["image", "label"]),
            ScaleIntensityRanged("image", a_min=0, a_max=255, b_min=0, b_max=1),
            BinarizeMaskd("label"),
        ]
    )
    net = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        net.weight.fill_(10.0)
        net.bias.fill_(-5.0)
    pair = from_engine(["pred", "label"])
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(_write_items(tmp_path), load), batch_size=2),
        network=net,
        postprocessing=Compose([Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)]),
        key_val_metric={"val_mean_dice": MeanDice(output_transform=pair)},
        additional_metrics={
            "val_mean_iou": MeanIoUHandler(output_transform=pair),
            "val_global_dice": ConfusionMatrix(metric_name="f1 score", reduction="sum", output_transform=pair),
            "val_global_iou": ConfusionMatrix(metric_name="threat score", reduction="sum", output_transform=pair),
        },
        val_handlers=handlers,
    )


def test_per_image_metrics_writer(tmp_path, caplog):
    out_dir = tmp_path / "eval"
    writer = SegmentationMetricsSaver(out_dir)
    evaluator = _evaluator(tmp_path, [writer])
    with caplog.at_level(logging.INFO, logger="himix_monai.handlers"):
        evaluator.run()

    with open(out_dir / "per_image_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [str(tmp_path / f"img_{n}.png") for n in "abc"]
    np.testing.assert_allclose([float(r["dice"]) for r in rows], [1.0, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose([float(r["iou"]) for r in rows], [1.0, 1 / 3, 0.0], atol=1e-6)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["n_images"] == 3
    assert summary["dice_mean"] == pytest.approx(0.5, abs=1e-6)
    assert summary["dice_std"] == pytest.approx(np.std([1.0, 0.5, 0.0]), abs=1e-6)
    assert summary["iou_mean"] == pytest.approx(4 / 9, abs=1e-6)
    assert summary["iou_std"] == pytest.approx(np.std([1.0, 1 / 3, 0.0]), abs=1e-6)
    assert summary["global_dice"] == pytest.approx(0.75, abs=1e-6)
    assert summary["global_iou"] == pytest.approx(0.6, abs=1e-6)
    assert summary["global_dice"] != pytest.approx(summary["dice_mean"], abs=0.1)
    assert writer.summary["global_iou"] == pytest.approx(0.6, abs=1e-6)

    lines = [r.getMessage() for r in caplog.records if "global Dice" in r.getMessage()]
    assert lines == [
        "Dice 0.5000 ± 0.4082, IoU 0.4444 ± 0.4157 (mean ± std over 3 images); "
        "global Dice 0.7500, global IoU 0.6000 (all pixels)"
    ]


def test_per_image_metrics_writer_names_a_missing_metric(tmp_path):
    evaluator = _evaluator(tmp_path, [SegmentationMetricsSaver(tmp_path / "eval", dice_metric="val_dice")])
    with pytest.raises(KeyError, match="val_dice"):
        evaluator.run()


def test_overlay_saver_on_evaluator(tmp_path):
    out_dir = tmp_path / "overlays"
    _evaluator(tmp_path, [OverlaySaver(out_dir, alpha=1.0)]).run()
    assert sorted(p.name for p in out_dir.iterdir()) == [f"img_{n}_overlay.png" for n in "abc"]
    b = np.asarray(Image.open(out_dir / "img_b_overlay.png").convert("RGB"))
    assert b.shape == (4, 4, 3)
    assert tuple(b[2, 0]) == RED and tuple(b[2, 1]) == YELLOW and tuple(b[2, 2]) == GREEN
    assert tuple(b[0, 0]) == (0, 0, 0)
    c = np.asarray(Image.open(out_dir / "img_c_overlay.png").convert("RGB"))
    assert all(tuple(px) == RED for px in c[3]) and c[:3].max() == 0


def test_overlay_saver_batch_dict_without_label_and_logit_warning(tmp_path, caplog):
    class FakeState:
        iteration = 7
        batch = None
        output = {
            "image": MetaTensor(torch.zeros(2, 1, 3, 3), meta={"filename_or_obj": ["/x/one.nii.gz", "/x/two.png"]}),
            "pred": torch.where(torch.arange(3)[:, None] < 2, 1.0, -1.0).expand(2, 1, 3, 3) * 4,  # logits
        }

    class FakeEngine:
        state = FakeState()

    saver = OverlaySaver(tmp_path, label_key="label")
    with caplog.at_level(logging.WARNING, logger="himix_monai.visualize"):
        saver(FakeEngine())
        saver(FakeEngine())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_overlay.png", "two_overlay.png"]
    assert sum("logits" in r.getMessage() for r in caplog.records) == 1
    one = np.asarray(Image.open(tmp_path / "one_overlay.png").convert("RGB"))
    # prediction-only overlay: rows 0-1 predicted; their boundary to the background row in full colour
    assert tuple(one[1, 1]) == PREDICTION_COLOR
    assert tuple(one[0, 0]) == (0, 128, 128) and tuple(one[2, 2]) == (0, 0, 0)
