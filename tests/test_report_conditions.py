"""What the report does: permuted / no-report evaluation and the training options for wrong and missing reports."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from monai.transforms import Activationsd, AsDiscreted, Compose, Lambdad

from himix_monai.report_conditions import (
    PrepareBatchReportNoise,
    ReportConditionsEvaluation,
    permute_reports,
    report_derangement,
)


def test_derangement_gives_no_item_its_own_text_where_possible():
    texts = ["left", "left", "left", "right", "right", "upper", "lower", "both"]
    for seed in range(20):
        perm = report_derangement(texts, seed)
        assert sorted(perm) == list(range(len(texts)))
        assert all(texts[p] != t for p, t in zip(perm, texts))
    assert report_derangement(texts, 3) == report_derangement(texts, 3)  # seeded
    assert report_derangement(["a"], 0) == [0]
    assert report_derangement(["a", "a"], 0) == [1, 0]  # only the index can change


def test_permute_reports_keeps_images_and_labels():
    items = [{"image": f"{i}.png", "label": f"{i}_mask.png", "text": f"report {i}"} for i in range(5)]
    permuted = permute_reports(items, seed=1)
    assert [(p["image"], p["label"]) for p in permuted] == [(i["image"], i["label"]) for i in items]
    assert all(p["text"] == items[p["report_source"]]["text"] != i["text"] for p, i in zip(permuted, items))
    assert items[0]["text"] == "report 0"  # input untouched
    with pytest.raises(KeyError, match="no 'text'"):
        permute_reports([{"image": "a.png"}, {"image": "b.png", "text": "x"}])


def _batch(n: int = 6):
    ids = torch.arange(1, n + 1)[:, None].repeat(1, 4)  # row i's report is all i+1
    return {"image": torch.randn(n, 1, 8, 8), "label": torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, 8, 8),
            "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_prepare_batch_report_noise_drops_and_swaps_as_asked():
    batch = _batch()
    image, label, (ids, mask), _ = PrepareBatchReportNoise(drop_prob=0.0, mismatch_prob=0.0)(batch)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])

    _, label, (ids, mask), _ = PrepareBatchReportNoise(drop_prob=1.0)(batch)
    assert not mask.any() and not ids.any()
    assert torch.equal(label, batch["label"])  # the target is untouched

    for seed in range(5):
        image, label, (ids, mask), _ = PrepareBatchReportNoise(mismatch_prob=1.0, seed=seed)(batch)
        sources = ids[:, 0] - 1
        assert sorted(sources.tolist()) == list(range(6)) and all(sources != torch.arange(6))  # nobody keeps its own
        assert torch.equal(label, batch["label"]) and torch.equal(image, batch["image"]) and mask.all()

    # the fractions: 2000 rows, half dropped, a quarter given another row's report
    noise = PrepareBatchReportNoise(drop_prob=0.5, mismatch_prob=0.25, seed=0)
    dropped = swapped = 0
    for _ in range(250):
        _, _, (ids, mask), _ = noise(_batch(8))
        dropped += int((~mask.bool().any(dim=1)).sum())
        kept = mask.bool().any(dim=1)
        swapped += int((ids[kept, 0] != torch.arange(1, 9)[kept]).sum())
        assert torch.equal(ids[~kept], torch.zeros_like(ids[~kept]))
    assert dropped / 2000 == pytest.approx(0.5, abs=0.05)
    assert swapped / (2000 - dropped) == pytest.approx(0.25, abs=0.05)
    with pytest.raises(ValueError, match="drop_prob"):
        PrepareBatchReportNoise(drop_prob=1.5)


class _ReadsTheReport(torch.nn.Module):
    """Marks the left image half for the report "left" (token 1), the right half for "right" (token 2), and
    everything bright without a report: a model that reads the report."""

    def forward(self, image, input_ids=None, attention_mask=None):
        bright = image > 0.5
        width = image.shape[-1]
        columns = torch.arange(width).view(1, 1, 1, width)
        if input_ids is None:
            return torch.where(bright, 10.0, -10.0)
        present = attention_mask.bool().any(dim=1).view(-1, 1, 1, 1)
        side = input_ids[:, 0].view(-1, 1, 1, 1)
        wanted = torch.where(side == 1, columns < width // 2, columns >= width // 2)
        return torch.where(bright & (wanted | ~present), 10.0, -10.0)


def _items(n: int = 6) -> list[dict]:
    items = []
    for i in range(n):
        image = torch.zeros(1, 8, 8)
        image[:, 2:4, 1:3] = 1.0  # a lesion on the left
        image[:, 5:7, 5:7] = 1.0  # one on the right
        left = i % 2 == 0
        label = torch.zeros(1, 8, 8)
        label[:, 2:4, 1:3] = float(left)
        label[:, 5:7, 5:7] = float(not left)
        items.append({"image": image, "label": label, "text": "left" if left else "right"})
    return items


def test_report_conditions_evaluation_reports_matched_permuted_and_none(tmp_path, caplog):
    from monai.data import DataLoader, Dataset
    from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator
    from monai.handlers import ConfusionMatrix, IgniteMetricHandler, from_engine
    from monai.metrics import DiceMetric, MeanIoU

    def tokenize(text):
        return torch.tensor([1 if text == "left" else 2, 0])

    transform = Compose(
        [
            Lambdad("text", tokenize, overwrite="input_ids"),
            Lambdad("input_ids", lambda ids: torch.tensor([1, 0]), overwrite="attention_mask"),
        ]
    )
    items = _items()
    post = Compose([Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)])
    pair = from_engine(["pred", "label"])
    net = _ReadsTheReport()
    (tmp_path / "summary.json").write_text(json.dumps({"dice_mean": 1.0}))  # the per-image writer's file
    handler = ReportConditionsEvaluation(
        data=items, transform=transform, network=net, device="cpu", inferer=None, postprocessing=post,
        batch_size=4, output_dir=tmp_path, seed=0,
    )  # fmt: skip
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(items, transform), batch_size=4),
        network=net,
        prepare_batch=PrepareBatchExtraInput(["input_ids", "attention_mask"]),
        postprocessing=post,
        key_val_metric={"val_mean_dice": IgniteMetricHandler(DiceMetric(ignore_empty=False), output_transform=pair)},
        additional_metrics={
            "val_mean_iou": IgniteMetricHandler(MeanIoU(ignore_empty=False), output_transform=pair),
            "val_global_dice": ConfusionMatrix(metric_name="f1 score", reduction="sum", output_transform=pair),
            "val_global_iou": ConfusionMatrix(metric_name="threat score", reduction="sum", output_transform=pair),
        },
        val_handlers=[handler],
    )
    with caplog.at_level(logging.INFO):
        evaluator.run()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dice_mean"] == 1.0  # the other keys are kept
    conditions = summary["report_conditions"]
    assert list(conditions) == ["matched", "permuted", "none"]
    assert conditions["matched"]["dice_mean"] == pytest.approx(1.0)
    assert conditions["permuted"]["n_same_text"] == 0
    assert conditions["permuted"]["dice_mean"] == pytest.approx(0.0)  # every image marked on the wrong side
    assert conditions["none"]["dice_mean"] == pytest.approx(2 * 4 / (4 + 8))  # both lesions marked
    assert conditions["none"]["global_iou"] == pytest.approx(0.5)
    assert all(c["n_images"] == 6 for c in conditions.values())
    assert handler.results == conditions
    log = caplog.text
    assert "matched  report: Dice 1.0000" in log and "permuted report: Dice 0.0000" in log and "none     report" in log


def test_train_json_switches_reach_the_trainer_and_the_network(tmp_path):
    """``text_dropout`` / ``text_mismatch`` set the trainer's prepare_batch (the validator keeps the plain one);
    ``layer_grouping clustering`` fits the DLFM groups from the training reports in ``run``;
    ``removed_layer_group`` removes one stage's cross-attention."""
    from pathlib import Path

    from monai.bundle import ConfigParser
    from monai.engines import PrepareBatchExtraInput

    from himix_monai.demo.slices import generate_demo_dataset

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    datalist = generate_demo_dataset(tmp_path / "demo", num=6, size=64)
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "datalist": str(datalist),
            "image_encoder": "test_convnext",
            "network_def#num_heads": 4,
            "image_size": [64, 64],
            "text_dropout": 0.3,
            "text_mismatch": 0.2,
            "layer_grouping": "clustering",
            "removed_layer_group": 2,
            "device": "$torch.device('cpu')",
        }
    )
    prepare = parser.get_parsed_content("train#prepare_batch")
    assert isinstance(prepare, PrepareBatchReportNoise) and (prepare.drop_prob, prepare.mismatch_prob) == (0.3, 0.2)
    validate = parser.get_parsed_content("prepare_batch")
    assert type(validate) is PrepareBatchExtraInput
    network = parser.get_parsed_content("network")
    assert [stage.text_projection is None for stage in network.stages] == [False, True, False]  # G_2: middle stage
    before = network.layer_fusion.membership.clone()
    parser.get_parsed_content("run#0")  # the clustering step of run
    groups = network.layer_fusion.groups
    assert sorted(j for g in groups for j in g) == list(range(1, network.text_encoder.num_layers + 1))
    assert network.layer_fusion.membership.shape == before.shape
