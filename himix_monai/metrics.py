"""
The segmentation scores of the bundle, defined once: per-image Dice and IoU, their mean ± std, and the global
(all-pixel) Dice and IoU.

Every score is computed by a MONAI metric handler attached to an evaluator; this module only names them
(:py:func:`segmentation_metrics`) and reads them back (:py:func:`summarize_scores`), so that evaluation
(``SegmentationMetricsSaver``), the report-condition runs (:py:mod:`himix_monai.report_conditions`) and the
ablation script (``benchmarks/ablation.py``) report the same numbers in the same way:

- per image: ``DiceMetric`` / ``MeanIoU`` with ``include_background=True, ignore_empty=False`` (MONAI's
  convention for empty masks: an empty prediction on an empty mask scores 1, anything predicted on an empty mask
  scores 0), kept per image in ``engine.state.metric_details`` (``save_details=True``, the default);
- global: ``ConfusionMatrix(metric_name="f1 score" / "threat score", compute_sample=False, reduction="sum")``,
  TP/FP/FN summed over all pixels of the set before the ratio (the official HiMix code's torchmetrics scores);
  a 0/0 global score (no lesion pixel in any mask nor prediction) counts 1, as ``ignore_empty=False`` does;
- mean and population std (``ddof=0``) over the images whose score is not NaN (a metric configured with
  ``ignore_empty=True`` scores empty masks NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from monai.utils import convert_to_numpy

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["SCORE_KEYS", "segmentation_metrics", "per_image_scores", "global_score", "summarize_scores"]

SCORE_KEYS: tuple[str, ...] = ("dice", "iou", "global_dice", "global_iou")
"""The four scores, as keys of the metric-name mappings of :py:func:`summarize_scores`."""


def segmentation_metrics(
    pred_key: str = "pred", label_key: str = "label", prefix: str = "val_", suffix: str = ""
) -> dict[str, Any]:
    """Fresh MONAI metric handlers of the four scores, named as in the bundle's configs.

    Args:
        pred_key: key of the binary prediction in the engine output.
        label_key: key of the label in the engine output.
        prefix: prefix of the names.
        suffix: suffix of the names (e.g. ``"_original"``).

    Returns:
        ``{"val_mean_dice": ..., "val_mean_iou": ..., "val_global_dice": ..., "val_global_iou": ...}``, in this
        order; the first is the usual key metric.

    Examples::

        metrics = segmentation_metrics()
        key = {"val_mean_dice": metrics.pop("val_mean_dice")}
        evaluator = SupervisedEvaluator(..., key_val_metric=key, additional_metrics=metrics)
    """
    from monai.handlers import ConfusionMatrix, IgniteMetricHandler, from_engine
    from monai.metrics import DiceMetric, MeanIoU

    pair = from_engine([pred_key, label_key])
    return {
        f"{prefix}mean_dice{suffix}": IgniteMetricHandler(
            DiceMetric(include_background=True, ignore_empty=False), output_transform=pair
        ),
        f"{prefix}mean_iou{suffix}": IgniteMetricHandler(
            MeanIoU(include_background=True, ignore_empty=False), output_transform=pair
        ),
        f"{prefix}global_dice{suffix}": ConfusionMatrix(
            include_background=True,
            metric_name="f1 score",
            compute_sample=False,
            reduction="sum",
            output_transform=pair,
        ),
        f"{prefix}global_iou{suffix}": ConfusionMatrix(
            include_background=True,
            metric_name="threat score",
            compute_sample=False,
            reduction="sum",
            output_transform=pair,
        ),
    }


def per_image_scores(details: Any) -> np.ndarray:
    """Per-image scores ``(N,)`` from a metric's details ``(N, C)`` (``engine.state.metric_details[name]``): the
    mean over channels, NaN where every channel is NaN."""
    scores = np.asarray(convert_to_numpy(details), dtype=np.float64)
    if scores.ndim == 0:
        scores = scores.reshape(1)
    if scores.ndim > 1:
        scores = scores.reshape(scores.shape[0], -1)
        with np.errstate(all="ignore"):
            counts = np.sum(~np.isnan(scores), axis=1)
            sums = np.nansum(scores, axis=1)
            scores = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return scores


def global_score(value: Any) -> float:
    """A global (all-pixel) score as a float; 0/0 (NaN: no lesion pixel anywhere) counts 1."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1)
        number = float(value[0]) if value.numel() else math.nan
    else:
        number = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
    return 1.0 if math.isnan(number) else number


def summarize_scores(engine: Engine, metrics: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """The scores of a finished evaluator run, read from the MONAI metric handlers attached to it.

    Args:
        engine: the evaluator, after ``run()``.
        metrics: the engine's metric name of each of :py:data:`SCORE_KEYS`; a key left out or None is not
            reported. Default: the names of :py:func:`segmentation_metrics`.

    Returns:
        ``{"n_images", "n_scored", "dice_mean", "dice_std", "iou_mean", "iou_std", "global_dice",
        "global_iou"}`` (values of scores not reported are None) and, under ``"per_image"``, the per-image arrays
        ``{"dice": (N,), "iou": (N,)}`` of the reported ones. ``n_scored`` counts the images whose Dice (else
        IoU) is not NaN: those that entered mean and std.

    Raises:
        KeyError: a named metric is not attached, naming it and the ones found.
    """
    names = dict(zip(SCORE_KEYS, ("val_mean_dice", "val_mean_iou", "val_global_dice", "val_global_iou")))
    if metrics is not None:
        unknown = sorted(set(metrics) - set(SCORE_KEYS))
        if unknown:
            raise ValueError(f"unknown scores {unknown}; use {list(SCORE_KEYS)}.")
        names = {key: metrics.get(key) for key in SCORE_KEYS}
    details = getattr(engine.state, "metric_details", {}) or {}
    out: dict[str, Any] = {}
    per_image: dict[str, np.ndarray] = {}
    for key in ("dice", "iou"):
        name = names.get(key)
        out[f"{key}_mean"] = out[f"{key}_std"] = None
        if name is None:
            continue
        if name not in details:
            raise KeyError(
                f"no per-image details of metric {name!r}; attach a MONAI metric handler named {name!r} with "
                f"save_details=True to the engine (found: {sorted(details)})."
            )
        scores = per_image[key] = per_image_scores(details[name])
        valid = scores[~np.isnan(scores)]
        if valid.size:
            out[f"{key}_mean"], out[f"{key}_std"] = float(valid.mean()), float(valid.std())
    for key in ("global_dice", "global_iou"):
        name = names.get(key)
        out[key] = None
        if name is None:
            continue
        if name not in engine.state.metrics:
            raise KeyError(
                f"metric {name!r} not found in engine.state.metrics (found: {sorted(engine.state.metrics)})."
            )
        out[key] = global_score(engine.state.metrics[name])
    scored = per_image.get("dice", per_image.get("iou"))
    n_images = max((len(v) for v in per_image.values()), default=0)
    out = {
        "n_images": n_images,
        "n_scored": int(np.sum(~np.isnan(scored))) if scored is not None else n_images,
        **out,
        "per_image": per_image,
    }
    return out
