"""
Overlays of predictions and per-image metric reports for text-guided lesion segmentation.

- :py:func:`overlay_prediction` / :py:func:`save_overlay`: grey image with true positives in yellow, false
  negatives in red and false positives in green (the colours of the HiMix paper, Fig. 4), or the prediction
  alone in one colour when there is no label.
- :py:class:`OverlaySaver`: ignite handler that writes one overlay PNG per image during evaluation.
- :py:class:`PerImageMetricsWriter`: ignite handler that writes a per-image ``image,dice,iou`` CSV and a
  ``summary.json`` with mean ± std (supplement Table 3 style) and the global all-pixel Dice and IoU (what the
  official code and the peers report), from MONAI's metric handlers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from monai.config import NdarrayOrTensor, PathLike
from monai.data import decollate_batch
from monai.utils import IgniteInfo, convert_to_numpy, min_version, optional_import, string_list_all_gather

from himix_monai.files import atomic_path, file_stem, write_text_atomically
from himix_monai.transforms.mask import meta_filename

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine

    from himix_monai.data.inference_items import OutputNames
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "TRUE_POSITIVE_COLOR",
    "FALSE_NEGATIVE_COLOR",
    "FALSE_POSITIVE_COLOR",
    "PREDICTION_COLOR",
    "overlay_prediction",
    "save_overlay",
    "OverlaySaver",
    "PerImageMetricsWriter",
]

logger = logging.getLogger(__name__)

TRUE_POSITIVE_COLOR: tuple[int, int, int] = (255, 255, 0)  # yellow
FALSE_NEGATIVE_COLOR: tuple[int, int, int] = (255, 0, 0)  # red
FALSE_POSITIVE_COLOR: tuple[int, int, int] = (0, 255, 0)  # green
PREDICTION_COLOR: tuple[int, int, int] = (0, 255, 255)  # cyan, prediction without a label

# ITU-R BT.601 luma weights
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def _grey_2d(image: NdarrayOrTensor) -> np.ndarray:
    """(H, W), (1, H, W) or (3, H, W) -> (H, W) float64 grey."""
    img = np.asarray(convert_to_numpy(image), dtype=np.float64)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    elif img.ndim == 3 and img.shape[0] in (3, 4):
        img = np.tensordot(_LUMA_WEIGHTS, img[:3], axes=1)
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), (1, H, W) or (3, H, W), got shape {img.shape}.")
    return img


def _mask_2d(mask: NdarrayOrTensor, name: str) -> np.ndarray:
    """(H, W) or (1, H, W) -> (H, W) bool, foreground ``> 0.5``."""
    m = np.asarray(convert_to_numpy(mask))
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"{name} must be a single-channel mask (H, W) or (1, H, W), got shape {m.shape}.")
    return m > 0.5


def _normalise_to_uint8(grey: np.ndarray) -> np.ndarray:
    low, high = float(np.min(grey)), float(np.max(grey))
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return np.zeros(grey.shape, dtype=np.float64)
    return (grey - low) / (high - low) * 255.0


def overlay_prediction(
    image: NdarrayOrTensor,
    pred: NdarrayOrTensor,
    label: NdarrayOrTensor | None = None,
    alpha: float = 0.5,
    pred_color: Sequence[int] = PREDICTION_COLOR,
    outline: bool = True,
) -> np.ndarray:
    """
    Colour a prediction on its grey image.

    The image is converted to grey (luminance for RGB) and min-max normalised to 0..255 per image. With a
    label, true positives are blended with yellow, false negatives with red and false positives with green
    (paper Fig. 4); true negatives stay grey. Without a label, the prediction is blended with ``pred_color``
    and, with ``outline``, its boundary is drawn in the full colour. A blended pixel is
    ``(1 - alpha) * grey + alpha * colour``, rounded.

    Masks are foreground where ``> 0.5``: give binary (post-processed) predictions, not logits.

    Args:
        image: ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` image.
        pred: ``(H, W)`` or ``(1, H, W)`` binary prediction.
        label: ``(H, W)`` or ``(1, H, W)`` binary ground truth, or None.
        alpha: opacity of the colours, 0..1.
        pred_color: RGB colour of the prediction when ``label`` is None.
        outline: draw the prediction boundary in full colour when ``label`` is None.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Examples::

        rgb = overlay_prediction(image, pred, label)  # yellow TP, red FN, green FP
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    grey = _normalise_to_uint8(_grey_2d(image))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    p = _mask_2d(pred, "pred")
    if p.shape != grey.shape:
        raise ValueError(f"pred shape {p.shape} does not match image shape {grey.shape}.")

    def blend(region: np.ndarray, color: Sequence[int], opacity: float) -> None:
        rgb[region] = (1.0 - opacity) * rgb[region] + opacity * np.asarray(color, dtype=np.float64)

    if label is None:
        blend(p, pred_color, alpha)
        if outline and p.any():
            from skimage.segmentation import find_boundaries

            blend(find_boundaries(p, mode="inner"), pred_color, 1.0)
    else:
        lab = _mask_2d(label, "label")
        if lab.shape != grey.shape:
            raise ValueError(f"label shape {lab.shape} does not match image shape {grey.shape}.")
        blend(p & lab, TRUE_POSITIVE_COLOR, alpha)
        blend(~p & lab, FALSE_NEGATIVE_COLOR, alpha)
        blend(p & ~lab, FALSE_POSITIVE_COLOR, alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def save_overlay(
    path: PathLike,
    image: NdarrayOrTensor,
    pred: NdarrayOrTensor,
    label: NdarrayOrTensor | None = None,
    alpha: float = 0.5,
    transpose: bool = False,
) -> np.ndarray:
    """
    Write :py:func:`overlay_prediction` as a PNG file (parent folders are created).

    Args:
        path: output file, e.g. ``"out/img_001_overlay.png"``.
        image: ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` image.
        pred: binary prediction, ``(H, W)`` or ``(1, H, W)``.
        label: binary ground truth, or None to draw the prediction alone (fill and outline in cyan).
        alpha: opacity of the colours.
        transpose: swap the two spatial axes before writing; set it when the arrays were loaded with
            MONAI's ``PILReader`` default ``reverse_indexing=True`` (which loads a PNG as (C, W, H)), so the
            PNG has the orientation of the source image.

    Returns:
        the ``(H, W, 3)`` uint8 array that was written.
    """
    from PIL import Image

    rgb = overlay_prediction(image, pred, label, alpha=alpha)
    if transpose:
        rgb = np.ascontiguousarray(rgb.transpose(1, 0, 2))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as temp:
        Image.fromarray(rgb).save(os.fspath(temp), format="PNG")
    return rgb


def _as_item_list(data: Any) -> list:
    """Decollated items of ``engine.state.output`` / ``engine.state.batch`` (list already, or a batch dict)."""
    if isinstance(data, Mapping):
        return list(decollate_batch(data, detach=True))
    if isinstance(data, (list, tuple)):
        return list(data)
    return []


class OverlaySaver:
    """
    Ignite handler writing ``<output_dir>/<image stem>_overlay.png`` for every item an evaluator processes.

    On each ``ITERATION_COMPLETED`` it reads ``engine.state.output``; for MONAI's ``SupervisedEvaluator``
    with ``decollate=True`` (default) and ``postprocessing`` that is a list with one dict per image holding
    ``"image"`` (the network input, ``(C, H, W)``), ``"label"`` and ``"pred"`` after post-processing. A
    batch dict (``decollate=False``) is decollated here. The image stem comes from
    ``image.meta["filename_or_obj"]`` (or ``image_meta_dict``), else ``iter<iteration>_<index>``.

    ``pred`` must be the post-processed binary prediction (e.g. ``Activationsd(sigmoid=True)`` then
    ``AsDiscreted(threshold=0.5)``): masks are thresholded at 0.5, so logits would be drawn wrongly; a
    prediction with values outside [0, 1] is reported once in the log. The overlay is drawn at the network
    resolution (after resizing). Without ``label_key`` in the output, the prediction alone is drawn.

    Args:
        output_dir: folder of the PNG files (created).
        image_key: key of the image in each output item.
        pred_key: key of the binary prediction.
        label_key: key of the ground truth; items without it get a prediction-only overlay.
        alpha: opacity of the colours.
        transpose: swap the spatial axes before writing (images loaded with ``PILReader``'s default
            ``reverse_indexing=True``), see :py:func:`save_overlay`.
        output_postfix: appended to the stem: ``<stem>_<output_postfix>.png``.
        names: the run's output names (unique per input, relative path kept,
            :py:class:`~himix_monai.data.inference_items.OutputNames`); None names an overlay by its file stem.

    Examples::

        from monai.engines import SupervisedEvaluator
        from himix_monai.visualize import OverlaySaver

        evaluator = SupervisedEvaluator(..., postprocessing=post, val_handlers=[OverlaySaver("eval/overlays")])
        evaluator.run()  # eval/overlays/<image stem>_overlay.png

    """

    def __init__(
        self,
        output_dir: PathLike,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str | None = "label",
        alpha: float = 0.5,
        transpose: bool = False,
        output_postfix: str = "overlay",
        names: OutputNames | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.names = names
        self.image_key = image_key
        self.pred_key = pred_key
        self.label_key = label_key
        self.alpha = alpha
        self.transpose = transpose
        self.output_postfix = output_postfix
        self._logit_warned = False

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, usually a MONAI ``SupervisedEvaluator``.
        """
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine whose ``state.output`` holds the items of the current iteration.
        """
        items = _as_item_list(engine.state.output)
        batch_items = _as_item_list(engine.state.batch)
        for index, item in enumerate(items):
            filename = meta_filename(item, self.image_key)
            if filename is None and index < len(batch_items):
                filename = meta_filename(batch_items[index], self.image_key)
            if filename and self.names is not None:
                stem = self.names.stem(filename)
            else:
                stem = file_stem(filename) if filename else f"iter{engine.state.iteration}_{index}"
            pred = item[self.pred_key]
            if not self._logit_warned:
                values = convert_to_numpy(pred)
                if values.size and (values.min() < 0 or values.max() > 1):
                    self._logit_warned = True
                    logger.warning(
                        "OverlaySaver: %r has values outside [0, 1] (logits?); it expects the post-processed "
                        "binary prediction.",
                        self.pred_key,
                    )
            label = item.get(self.label_key) if self.label_key is not None else None
            save_overlay(
                self.output_dir / f"{stem}_{self.output_postfix}.png",
                item[self.image_key],
                pred,
                label,
                alpha=self.alpha,
                transpose=self.transpose,
            )


def _per_image_scores(details: Any, metric: str) -> np.ndarray:
    """``engine.state.metric_details[metric]`` (N, C) -> (N,) nan-mean over channels."""
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


def _nan_stats(values: np.ndarray) -> tuple[float, float]:
    valid = values[~np.isnan(values)]
    if valid.size == 0:
        return math.nan, math.nan
    return float(np.mean(valid)), float(np.std(valid))


def _scalar(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1)
        return float(value[0]) if value.numel() else math.nan
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else value


class PerImageMetricsWriter:
    """
    Ignite handler writing per-image Dice/IoU, their mean ± std and the global Dice/IoU at the end of an epoch.

    The numbers come from MONAI metric handlers attached to the same evaluator (nothing is recomputed):

    - per image: MONAI's Dice and IoU metric handlers with ``save_details=True`` (the default; the bundle uses
      ``IgniteMetricHandler`` with ``DiceMetric``/``MeanIoU(ignore_empty=False)``), whose per-image scores
      MONAI keeps in ``engine.state.metric_details``;
    - global, over all pixels of the set: ``ConfusionMatrix(metric_name="f1 score", reduction="sum")`` (Dice)
      and ``ConfusionMatrix(metric_name="threat score", reduction="sum")`` (IoU), which sum TP/FP/FN over all
      images before taking the ratio (the official HiMix code's torchmetrics scores).

    At ``EPOCH_COMPLETED`` (after the metrics, which the engine attaches before its handlers) it writes

    - ``<output_dir>/<csv_filename>``: columns ``image,dice,iou``, one row per image (multi-channel scores are
      averaged over channels);
    - ``<output_dir>/<summary_filename>``: ``n_images`` (rows), ``n_scored`` (rows whose Dice, else IoU,
      entered the mean), ``dice_mean``, ``dice_std``, ``iou_mean``, ``iou_std`` (population std, ``ddof=0``),
      ``global_dice``, ``global_iou``;

    and logs one line ``Dice mean ± std, IoU mean ± std (over N images); global Dice, global IoU``, where N
    is the number of rows that entered the mean. The summary is also kept in ``self.summary``.

    Empty masks: the bundle scores them with MONAI's convention (``DiceMetric(ignore_empty=False)`` and
    ``MeanIoU(ignore_empty=False)``): an empty prediction on an empty mask scores 1, any foreground predicted
    on an empty mask scores 0, so false positives on lesion-free images lower the mean. The global scores
    follow the same rule: a 0/0 global Dice or IoU (no lesion pixel in any mask nor prediction) is 1. A
    metric configured with ``ignore_empty=True`` scores empty masks NaN: such rows are written as ``nan``,
    left out of mean and std, named in a warning, and not counted in N. Image names come from the image's ``filename_or_obj`` meta data in
    ``engine.state.batch``. In distributed runs the names are gathered from all ranks (MONAI's metric buffers
    are gathered by MONAI) and only ``save_rank`` writes. Any of the four metric names may be None to leave
    that column or number out.

    Args:
        output_dir: folder of the CSV and JSON files (created).
        dice_metric: name of the per-image Dice metric (``MeanDice``) in the evaluator.
        iou_metric: name of the per-image IoU metric (``MeanIoUHandler``).
        global_dice_metric: name of the global Dice metric (``ConfusionMatrix``, ``"f1 score"``, sum).
        global_iou_metric: name of the global IoU metric (``ConfusionMatrix``, ``"threat score"``, sum).
        image_key: key of the image in the batch items (source of the file names).
        csv_filename: name of the per-image CSV.
        summary_filename: name of the summary JSON.
        save_rank: rank that writes the files.
        original_metrics: names of the same metrics computed at the images' original resolution (the prediction
            inverted to the input's size, ``Invertd``, against the label as loaded), under the keys ``dice``,
            ``iou``, ``global_dice``, ``global_iou``; when given, ``summary.json`` gets ``"resolution":
            "network"`` beside the keys above and an ``"original_resolution"`` object with the same keys, and
            their per-image scores go to ``original_csv_filename``. The keys above stay the network-resolution
            scores (labels resized to the network's input, as the paper reports them).
        original_csv_filename: name of the per-image CSV at the original resolution.

    Examples::

        from monai.handlers import ConfusionMatrix, IgniteMetricHandler, from_engine
        from monai.metrics import DiceMetric, MeanIoU
        from himix_monai.visualize import PerImageMetricsWriter

        pair = from_engine(["pred", "label"])
        dice = IgniteMetricHandler(DiceMetric(ignore_empty=False), output_transform=pair)  # empty vs empty = 1
        iou = IgniteMetricHandler(MeanIoU(ignore_empty=False), output_transform=pair)
        evaluator = SupervisedEvaluator(
            ...,
            key_val_metric={"val_mean_dice": dice},
            additional_metrics={
                "val_mean_iou": iou,
                "val_global_dice": ConfusionMatrix(metric_name="f1 score", reduction="sum", output_transform=pair),
                "val_global_iou": ConfusionMatrix(metric_name="threat score", reduction="sum", output_transform=pair),
            },
            val_handlers=[PerImageMetricsWriter("eval")],
        )

    """

    def __init__(
        self,
        output_dir: PathLike,
        dice_metric: str | None = "val_mean_dice",
        iou_metric: str | None = "val_mean_iou",
        global_dice_metric: str | None = "val_global_dice",
        global_iou_metric: str | None = "val_global_iou",
        image_key: str = "image",
        csv_filename: str = "per_image_metrics.csv",
        summary_filename: str = "summary.json",
        save_rank: int = 0,
        original_metrics: Mapping[str, str] | None = None,
        original_csv_filename: str = "per_image_metrics_original_resolution.csv",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.dice_metric = dice_metric
        self.iou_metric = iou_metric
        self.global_dice_metric = global_dice_metric
        self.global_iou_metric = global_iou_metric
        self.image_key = image_key
        self.csv_filename = csv_filename
        self.summary_filename = summary_filename
        self.save_rank = save_rank
        unknown = set(original_metrics or {}) - {"dice", "iou", "global_dice", "global_iou"}
        if unknown:
            raise ValueError(f"original_metrics: unknown keys {sorted(unknown)}; use dice, iou, global_dice, global_iou")
        self.original_metrics = dict(original_metrics or {})
        self.original_csv_filename = original_csv_filename
        self.summary: dict[str, Any] = {}
        self._filenames: list[str] = []

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine (an evaluator) with the metrics named in the constructor attached.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_filenames)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, _engine: Engine) -> None:
        self._filenames = []

    def _collect_filenames(self, engine: Engine) -> None:
        for index, item in enumerate(_as_item_list(engine.state.batch)):
            name = meta_filename(item, self.image_key)
            self._filenames.append(name if name is not None else f"iter{engine.state.iteration}_{index}")

    def _details(self, engine: Engine, metric: str | None) -> np.ndarray | None:
        if metric is None:
            return None
        details = getattr(engine.state, "metric_details", {})
        if metric not in details:
            raise KeyError(
                f"PerImageMetricsWriter: no per-image details of metric {metric!r}; attach a MONAI metric "
                f"handler named {metric!r} with save_details=True to the engine (found: {sorted(details)})."
            )
        return _per_image_scores(details[metric], metric)

    def _global(self, engine: Engine, metric: str | None) -> float | None:
        if metric is None:
            return None
        if metric not in engine.state.metrics:
            raise KeyError(
                f"PerImageMetricsWriter: metric {metric!r} not found in engine.state.metrics "
                f"(found: {sorted(engine.state.metrics)})."
            )
        return _scalar(engine.state.metrics[metric])

    def _score(
        self, engine: Engine, names: list[str], metrics: Sequence[str | None]
    ) -> tuple[dict[str, Any], list[str], list[tuple[str, np.ndarray]]]:
        """Summary, row names and per-image columns of one set of (dice, iou, global dice, global iou) metrics."""
        dice_metric, iou_metric, global_dice_metric, global_iou_metric = metrics
        dice = self._details(engine, dice_metric)
        iou = self._details(engine, iou_metric)
        global_dice = self._global(engine, global_dice_metric)
        global_iou = self._global(engine, global_iou_metric)
        lengths = [len(values) for values in (dice, iou) if values is not None]
        n_rows = max(lengths) if lengths else len(names)
        if len(names) != n_rows:
            logger.warning(
                "PerImageMetricsWriter: %d image names for %d metric rows; writing row numbers instead.",
                len(names),
                n_rows,
            )
            names = [str(i) for i in range(n_rows)]
        dice_mean, dice_std = _nan_stats(dice) if dice is not None else (None, None)
        iou_mean, iou_std = _nan_stats(iou) if iou is not None else (None, None)
        scored = dice if dice is not None else iou
        n_scored = int(np.sum(~np.isnan(scored))) if scored is not None else n_rows
        if n_scored < n_rows:
            unscored = [name for name, value in zip(names, scored) if np.isnan(value)]
            logger.warning(
                "PerImageMetricsWriter: %d of %d images have no score (NaN; a metric with ignore_empty=True "
                "scores empty masks so) and are left out of mean and std: %s%s",
                len(unscored),
                n_rows,
                ", ".join(unscored[:10]),
                ", ..." if len(unscored) > 10 else "",
            )
        if n_rows:
            # 0/0: no lesion pixel in any mask nor prediction; 1 by MONAI's ignore_empty=False convention
            global_dice = 1.0 if global_dice is not None and math.isnan(global_dice) else global_dice
            global_iou = 1.0 if global_iou is not None and math.isnan(global_iou) else global_iou
        summary = {
            "n_images": n_rows,
            "n_scored": n_scored,
            "dice_mean": dice_mean,
            "dice_std": dice_std,
            "iou_mean": iou_mean,
            "iou_std": iou_std,
            "global_dice": global_dice,
            "global_iou": global_iou,
        }
        columns = [(title, values) for title, values in (("dice", dice), ("iou", iou)) if values is not None]
        return summary, names, columns

    def _write_csv(self, filename: str, names: list[str], columns: list[tuple[str, np.ndarray]]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(["image", *(title for title, _ in columns)])
        for i, name in enumerate(names):
            writer.writerow([name, *(f"{values[i]:.6f}" for _, values in columns)])
        write_text_atomically(self.output_dir / filename, buffer.getvalue(), newline="")

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine at ``EPOCH_COMPLETED``.
        """
        world_size = idist.get_world_size()
        if self.save_rank >= world_size:
            raise ValueError("save_rank is greater than the distributed group size.")
        names = string_list_all_gather(strings=self._filenames) if world_size > 1 else list(self._filenames)
        metrics = (self.dice_metric, self.iou_metric, self.global_dice_metric, self.global_iou_metric)
        summary, rows, columns = self._score(engine, names, metrics)
        original = None
        if self.original_metrics:
            keys = ("dice", "iou", "global_dice", "global_iou")
            original = self._score(engine, names, [self.original_metrics.get(key) for key in keys])
        if idist.get_rank() != self.save_rank:
            return

        self.summary = dict(summary)
        self._write_csv(self.csv_filename, rows, columns)
        if original is not None:
            self.summary["resolution"] = "network"
            self.summary["original_resolution"] = original[0]
            self._write_csv(self.original_csv_filename, original[1], original[2])

        def number(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {k: number(v) for k, v in value.items()}
            return _json_number(value) if isinstance(value, float) else value

        write_text_atomically(self.output_dir / self.summary_filename, json.dumps(number(self.summary), indent=2))

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        for label, scores in [("network resolution", summary)] + ([("original resolution", original[0])] if original else []):
            logger.info(
                "Dice %s ± %s, IoU %s ± %s (mean ± std over %d images); global Dice %s, global IoU %s (all pixels)%s",
                fmt(scores["dice_mean"]),
                fmt(scores["dice_std"]),
                fmt(scores["iou_mean"]),
                fmt(scores["iou_std"]),
                scores["n_scored"],
                fmt(scores["global_dice"]),
                fmt(scores["global_iou"]),
                f" at the {label}" if original else "",
            )
