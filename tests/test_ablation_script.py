"""Smoke test of ``benchmarks/ablation.py`` on a synthetic 8-image fixture (tiny networks, 1 epoch)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _load_ablation():
    """Import ``benchmarks/ablation.py`` (a script, not a package) once."""
    spec = importlib.util.spec_from_file_location("himix_ablation_script", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def synthetic_datalists(tmp_path):
    """8 RGB 64x64 JPEG images with a bright disc, 0/255 masks; a p9-like and a report-like datalist."""
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for index in range(8):
        yy, xx = np.mgrid[:64, :64]
        cy, cx, r = rng.integers(16, 48), rng.integers(16, 48), rng.integers(6, 14)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        image = (rng.random((64, 64, 3)) * 60).astype(np.uint8)
        image[disc] = 200
        Image.fromarray(image).save(tmp_path / f"img{index}.jpg")
        Image.fromarray((disc * 255).astype(np.uint8)).save(tmp_path / f"mask{index}.jpg")
        side = "left" if cx < 32 else "right"
        items.append({"image": str(tmp_path / f"img{index}.jpg"), "label": str(tmp_path / f"mask{index}.jpg"),
                      "text": f"one large polyp located in the {side} of the image"})
    p9 = {"training": items[:6], "validation": items[6:]}
    reports = {k: [dict(it, text=f"one small polyp {it['text'].split()[-4]}") for it in v] for k, v in p9.items()}
    p9_path, reports_path = tmp_path / "p9.json", tmp_path / "reports.json"
    p9_path.write_text(json.dumps(p9))
    reports_path.write_text(json.dumps(reports))
    return str(p9_path), str(reports_path)


def test_derangement_has_no_fixed_points():
    ablation = _load_ablation()
    perm = ablation.derangement(10, seed=0)
    assert sorted(perm.tolist()) == list(range(10))
    assert not np.any(perm == np.arange(10))
    np.testing.assert_array_equal(perm, ablation.derangement(10, seed=0))


def test_ablation_scores_are_the_bundles():
    """Fails if the ablation script's scores are not the bundle's definitions (himix_monai.metrics): per-image Dice
    and IoU, global (all-pixel) Dice and IoU, 0/0 counting 1."""
    from ignite.engine import Engine

    from himix_monai.metrics import segmentation_metrics

    ablation = _load_ablation()
    label = torch.zeros(1, 4, 4)
    label[:, :2] = 1  # 8 foreground pixels
    pred = torch.zeros(1, 4, 4)
    pred[:, :1] = 1  # 4 true positives, 4 false negatives
    batches = [[{"pred": pred, "label": label}, {"pred": label, "label": label}]]
    engine = Engine(lambda engine, batch: batch)
    for name, metric in segmentation_metrics().items():
        metric.attach(engine, name)
    engine.run(batches)
    summary = ablation.summarize(engine)
    assert summary["num_images"] == 2
    assert summary["dice_mean"] == pytest.approx((2 * 4 / 12 + 1.0) / 2)
    assert summary["dice_per_image"] == pytest.approx([2 * 4 / 12, 1.0], abs=1e-5)
    assert summary["global_dice"] == pytest.approx(2 * 12 / (2 * 12 + 0 + 4))
    assert summary["global_iou"] == pytest.approx(12 / 16)

    empty = torch.zeros(1, 4, 4)
    engine = Engine(lambda engine, batch: batch)
    for name, metric in segmentation_metrics().items():
        metric.attach(engine, name)
    engine.run([[{"pred": empty, "label": empty}]])
    assert ablation.summarize(engine)["global_dice"] == 1.0  # no lesion pixel anywhere: 1, as ignore_empty=False


@pytest.fixture
def restore_threads():
    """``main`` calls ``torch.set_num_threads``: restore the session's value afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_ablation_script_end_to_end(tmp_path, synthetic_datalists, tiny_text_model_dir, restore_threads):
    ablation = _load_ablation()
    p9, reports = synthetic_datalists
    out = tmp_path / "out"
    common = ["--datalist", p9, "--report-datalist", reports, "--out", str(out), "--epochs", "1",
              "--image-size", "64", "--batch-size", "2", "--image-encoder", "test_convnext",
              "--text-encoder", tiny_text_model_dir, "--max-length", "8", "--text-tokens", "6", "4", "3",
              "--num-heads", "4", "--threads", "1", "--device", "cpu", "--precision", "bf16"]
    ablation.main(common + ["--variants", "full", "image_only"])
    results = ablation.main(common + ["--variants", "full_reports"])  # a second process appends

    assert set(results["variants"]) == {"full", "image_only", "full_reports"}
    full = results["variants"]["full"]
    assert [row["eval"] for row in full["rows"]] == ["matched", "shuffled", "no_text"]
    assert full["rows"][1]["texts_changed"] >= 0
    assert [row["eval"] for row in results["variants"]["image_only"]["rows"]] == ["matched"]
    assert results["variants"]["full_reports"]["rows"][0]["text"] == "reports"
    for row in full["rows"]:
        assert 0.0 <= row["dice_mean"] <= 1.0 and 0.0 <= row["global_iou"] <= 1.0
        assert row["num_images"] == 2
    internals = full["internals"]
    assert len(internals["asrm_sigma_per_stage"]) == 3
    assert len(internals["dlfm_group_weights"]) == 3
    for weights in internals["dlfm_group_weights"]:
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert results["budget"]["epochs"] == 1 and results["budget"]["image_size"] == 64

    table = (out / "results.md").read_text()
    assert "| full | p9 |" in table and "| image_only | none |" in table and "shuffled" in table
    assert (out / "results.csv").read_text().count("\n") == 1 + 3 + 1 + 3
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "sigma_dlfm.png").stat().st_size > 0


def test_ablation_network_options_reach_himix(tiny_text_model_dir):
    """``--image-encoder-out-indices``, ``--text-tokens`` and ``--position-encoding`` build the network they name
    (a five-level timm encoder, one stage per level) and are recorded with the budget."""
    ablation = _load_ablation()
    args = ablation.parse_args(["--datalist", "unused.json", "--out", "unused", "--image-encoder", "resnet18",
                                "--text-encoder", tiny_text_model_dir, "--max-length", "8",
                                "--text-tokens", "6", "4", "3", "2", "--image-encoder-out-indices", "0", "1", "2", "3",
                                "4", "--position-encoding", "official_1d"])
    net = ablation.build_network("full", args)
    assert net.image_encoder.reductions == [2, 4, 8, 16, 32] and len(net.stages) == 4
    assert all(stage.position_encoding == "official_1d" for stage in net.stages)
    budget = ablation.budget(args)
    assert budget["image_encoder_out_indices"] == [0, 1, 2, 3, 4] and budget["text_tokens"] == [6, 4, 3, 2]
    assert budget["position_encoding"] == "official_1d"
