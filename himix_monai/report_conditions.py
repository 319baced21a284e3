"""
What the report does: evaluation with matched, permuted and missing reports, and training with wrong or missing ones.

HiMix segments what the report names. Two questions follow, and this module answers both with MONAI parts:

- *Does the model read the report, and what happens when it is wrong or missing?*
  :py:class:`ReportConditionsEvaluation` is an ignite handler for the bundle's evaluator: when the evaluator
  (the matched reports) has finished, it evaluates the same images twice more with the same network, inferer
  and post-processing, once with the reports permuted across the images (:py:func:`permute_reports`, a seeded
  derangement that gives no image a report with its own text where that is possible) and once with no report
  (every attention mask zero, see below), and reports Dice and IoU (mean ± std over the images, and global over
  all pixels) of the three conditions in the log and in ``summary.json`` (key ``"report_conditions"``).
- *Can training make the model robust to wrong and missing reports?*
  :py:class:`PrepareBatchReportNoise` is the trainer's ``prepare_batch`` with two options: ``drop_prob`` drops
  the report of that fraction of the training items (the model learns to segment from the image alone when
  there is no report) and ``mismatch_prob`` gives that fraction another item's report of the same batch while
  the target stays the item's own mask (the model learns not to follow a report blindly).

"No report" is an all-zero ``attention_mask`` row: :py:class:`~himix_monai.networks.HiMix` skips the
cross-attention of such a row (its mask is decoded as with ``input_ids=None``) while the other rows of the
batch read their reports, so a report can be dropped per item inside a batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from monai.config import PathLike
from monai.engines import PrepareBatchExtraInput
from monai.utils import IgniteInfo, min_version, optional_import

from himix_monai.files import write_text_atomically
from himix_monai.metrics import SCORE_KEYS, segmentation_metrics, summarize_scores

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "REPORT_CONDITIONS",
    "report_derangement",
    "permute_reports",
    "PrepareBatchReportNoise",
    "condition_scores",
    "ReportConditionsEvaluation",
]

logger = logging.getLogger(__name__)

REPORT_CONDITIONS: tuple[str, ...] = ("matched", "permuted", "none")
"""The three evaluation conditions: each image with its own report, with another image's, with none."""


def report_derangement(texts: Sequence[str], seed: int = 0) -> list[int]:
    """A seeded permutation ``p`` of the items such that item ``i`` gets the report of item ``p[i]``, where
    ``p[i] != i`` and, where possible, ``texts[p[i]] != texts[i]`` (many reports repeat, e.g. QaTa-COV19's).

    A random permutation is drawn and then repaired by swaps: an item whose new text equals its own swaps its
    source with another item's where both then get a different text. Items for which no such swap exists (e.g.
    more than half the items share one text) keep a report with their own text; a single item keeps its own.

    Args:
        texts: the report of every item.
        seed: seed of the permutation.

    Returns:
        ``p`` as a list of indices.

    Examples::

        >>> report_derangement(["a", "b", "c"], seed=0)  # doctest: +SKIP
        [2, 0, 1]
    """
    n = len(texts)
    if n < 2:
        return list(range(n))
    rng = np.random.default_rng(seed)
    perm = [int(i) for i in rng.permutation(n)]

    for i in range(n):  # no index keeps its own report: swapping with any other item fixes i and keeps j moved
        if perm[i] == i:
            j = (i + 1 + int(rng.integers(n - 1))) % n
            perm[i], perm[j] = perm[j], perm[i]

    def bad(i: int) -> bool:
        return perm[i] == i or texts[perm[i]] == texts[i]

    for _ in range(3):
        clashes = [i for i in range(n) if bad(i)]
        if not clashes:
            break
        for i in clashes:
            if not bad(i):
                continue
            for j in (int(k) for k in rng.permutation(n)):
                if j == i:
                    continue
                # swapping the sources of i and j must fix i and not break j
                if perm[j] != i and texts[perm[j]] != texts[i] and perm[i] != j and texts[perm[i]] != texts[j]:
                    perm[i], perm[j] = perm[j], perm[i]
                    break
    return perm


def permute_reports(items: Sequence[Mapping[str, Any]], seed: int = 0, text_key: str = "text") -> list[dict]:
    """Copies of the datalist ``items`` whose reports are permuted with :py:func:`report_derangement`; images
    and labels stay in place, so every image keeps its own mask as the target.

    Args:
        items: datalist items with a text under ``text_key``.
        seed: seed of the permutation.
        text_key: key of the report.

    Returns:
        new item dicts (the input is not changed); each also records the index of the item whose report it got
        under ``"report_source"``.

    Examples::

        >>> permute_reports(
        ...     [{"image": "a.png", "text": "left"}, {"image": "b.png", "text": "right"}]
        ... )  # doctest: +NORMALIZE_WHITESPACE
        [{'image': 'a.png', 'text': 'right', 'report_source': 1},
         {'image': 'b.png', 'text': 'left', 'report_source': 0}]
    """
    missing = [index for index, item in enumerate(items) if text_key not in item]
    if missing:
        raise KeyError(f"datalist items {missing[:10]} have no {text_key!r}: there is no report to permute.")
    perm = report_derangement([str(item[text_key]) for item in items], seed)
    return [{**item, text_key: items[source][text_key], "report_source": source} for item, source in zip(items, perm)]


class PrepareBatchReportNoise(PrepareBatchExtraInput):
    """
    MONAI's ``PrepareBatchExtraInput`` that, before handing the batch to the network, drops or swaps reports.

    For every item of a batch, independently:

    - with probability ``mismatch_prob`` the item is given another item's report (``input_ids`` and
      ``attention_mask``) of the same batch; the chosen items pass their reports round in a random cycle, so
      none keeps its own (a chosen item alone in its batch takes a random other item's report). The label is
      untouched: the target stays the item's own mask.
    - with probability ``drop_prob`` the report is dropped: its ``attention_mask`` row becomes all zeros (and
      its ``input_ids`` the pad id 0), which HiMix reads as "no report" and skips that row's cross-attention.

    ``drop_prob=1`` drops every report: the evaluation without reports. With both probabilities 0 it is
    exactly ``PrepareBatchExtraInput``. Use it as the trainer's ``prepare_batch`` only (the bundle's
    ``train#prepare_batch``); the validation evaluator keeps the plain one.

    Args:
        extra_keys: the network's extra inputs, as for ``PrepareBatchExtraInput``.
        drop_prob: probability of dropping an item's report.
        mismatch_prob: probability of giving an item another item's report.
        input_ids_key: key of the token ids in the batch.
        attention_mask_key: key of the attention mask in the batch.
        seed: seed of this object's own random generator; ``None`` draws from torch's global generator (which
            the bundle seeds with its ``seed``).

    Examples::

        # train.json: "train#prepare_batch"
        prepare = PrepareBatchReportNoise(["input_ids", "attention_mask"], drop_prob=0.2, mismatch_prob=0.1)
        trainer = SupervisedTrainer(..., prepare_batch=prepare)
    """

    def __init__(
        self,
        extra_keys: str | Sequence[str] | dict[str, str] | None = ("input_ids", "attention_mask"),
        drop_prob: float = 0.0,
        mismatch_prob: float = 0.0,
        input_ids_key: str = "input_ids",
        attention_mask_key: str = "attention_mask",
        seed: int | None = None,
    ) -> None:
        if isinstance(extra_keys, (list, tuple)):
            extra_keys = list(extra_keys)
        super().__init__(extra_keys)
        for name, value in (("drop_prob", drop_prob), ("mismatch_prob", mismatch_prob)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")
        self.drop_prob = float(drop_prob)
        self.mismatch_prob = float(mismatch_prob)
        self.input_ids_key = input_ids_key
        self.attention_mask_key = attention_mask_key
        self.generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def _rand(self, size: int) -> torch.Tensor:
        return torch.rand(size, generator=self.generator)

    def _randperm(self, size: int) -> torch.Tensor:
        return torch.randperm(size, generator=self.generator)

    def noisy_reports(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ``(input_ids, attention_mask)`` with reports swapped and dropped as configured (new tensors).

        Args:
            input_ids: ``(B, L)`` token ids.
            attention_mask: ``(B, L)`` attention mask.
        """
        batch = int(input_ids.shape[0])
        source = torch.arange(batch)
        if self.mismatch_prob > 0 and batch > 1:
            chosen = torch.nonzero(self._rand(batch) < self.mismatch_prob).flatten()
            if chosen.numel() == 1:
                others = torch.cat([source[: int(chosen)], source[int(chosen) + 1 :]])
                source[chosen] = others[self._randperm(batch - 1)[0]]
            elif chosen.numel() > 1:
                cycle = chosen[self._randperm(chosen.numel())]
                source[cycle] = torch.roll(cycle, 1)
        index = source.to(input_ids.device)
        input_ids, attention_mask = input_ids[index], attention_mask[index]
        if self.drop_prob > 0:
            dropped = (self._rand(batch) < self.drop_prob).to(attention_mask.device)
            attention_mask = attention_mask.masked_fill(dropped[:, None], 0)
            input_ids = input_ids.masked_fill(dropped[:, None].to(input_ids.device), 0)
        return input_ids, attention_mask

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Any:
        if (self.drop_prob > 0 or self.mismatch_prob > 0) and self.attention_mask_key in batchdata:
            batchdata = dict(batchdata)
            ids, mask = self.noisy_reports(batchdata[self.input_ids_key], batchdata[self.attention_mask_key])
            batchdata[self.input_ids_key], batchdata[self.attention_mask_key] = ids, mask
        return super().__call__(batchdata, device, non_blocking, **kwargs)


def condition_scores(
    engine: Engine,
    dice_metric: str = "val_mean_dice",
    iou_metric: str = "val_mean_iou",
    global_dice_metric: str = "val_global_dice",
    global_iou_metric: str = "val_global_iou",
) -> dict[str, Any]:
    """Dice and IoU of a finished evaluator run, from the MONAI metric handlers attached to it.

    The definitions of :py:func:`himix_monai.metrics.summarize_scores` (per-image scores from
    ``engine.state.metric_details``, global ones from ``ConfusionMatrix`` with ``reduction="sum"``, a 0/0 global
    score counting 1).

    Args:
        engine: the evaluator, after ``run()``.
        dice_metric: name of the per-image Dice metric.
        iou_metric: name of the per-image IoU metric.
        global_dice_metric: name of the global Dice metric.
        global_iou_metric: name of the global IoU metric.

    Returns:
        ``{"n_images", "dice_mean", "dice_std", "iou_mean", "iou_std", "global_dice", "global_iou"}`` (population
        std; NaN rows are left out of mean and std).
    """
    names = dict(zip(SCORE_KEYS, (dice_metric, iou_metric, global_dice_metric, global_iou_metric)))
    scores = summarize_scores(engine, names)
    keys = ("n_images", "dice_mean", "dice_std", "iou_mean", "iou_std", "global_dice", "global_iou")
    return {key: scores[key] for key in keys}


class ReportConditionsEvaluation:
    """
    Ignite handler: after the evaluator it is attached to has run (the matched reports), evaluate the same images
    with the reports permuted across them and with no report, and report the three conditions side by side.

    At the evaluator's ``COMPLETED`` event it reads the matched scores from the evaluator's own metrics (names
    as in the bundle: ``val_mean_dice``, ``val_mean_iou``, ``val_global_dice``, ``val_global_iou``), then runs
    two MONAI ``SupervisedEvaluator`` passes with the same network, device, inferer and post-processing and
    fresh metric handlers:

    - ``permuted``: a ``monai.data.Dataset`` of :py:func:`permute_reports` of ``data`` (seeded by ``seed``);
    - ``none``: ``data`` as it is, with :py:class:`PrepareBatchReportNoise` ``(drop_prob=1)``: no image gets a
      report.

    It then logs one line per condition (Dice and IoU mean ± std over the images, global Dice and IoU over all
    pixels) and adds them, with the seed and the number of images whose permuted report had their own text, to
    ``<output_dir>/<summary_filename>`` under ``"report_conditions"`` (the file's other keys, written by the
    per-image metrics handler at ``EPOCH_COMPLETED``, are kept; the file is replaced atomically). The result is
    also kept in ``self.results``. Single-process only (the bundle's ``evaluate.json`` runs on one device).

    How to read it: ``matched`` well above ``permuted`` and ``none`` means the model uses the report; ``none``
    near ``matched`` means the image alone decides; ``permuted`` far below ``none`` means a wrong report
    misleads the model more than no report.

    Args:
        data: the evaluated datalist items (the matched run's), with their reports under ``text_key``.
        transform: the evaluation preprocessing (the bundle's ``validate#preprocessing``).
        network: the evaluated network.
        device: device of the network.
        inferer: the evaluation inferer.
        postprocessing: the evaluation post-processing (sigmoid and threshold).
        batch_size: evaluation batch size.
        output_dir: folder of the summary JSON.
        extra_keys: the network's extra inputs (``PrepareBatchExtraInput``).
        seed: seed of the report permutation.
        conditions: which of ``"permuted"`` and ``"none"`` to run besides the matched reports.
        text_key: key of the report in ``data``.
        summary_filename: JSON file the results are added to.
        num_workers: DataLoader workers.

    Examples::

        evaluator = SupervisedEvaluator(..., val_handlers=[..., ReportConditionsEvaluation(
            data=items, transform=preprocessing, network=net, device=device, inferer=inferer,
            postprocessing=post, batch_size=8, output_dir="eval")])
        evaluator.run()  # logs matched / permuted / none, adds "report_conditions" to eval/summary.json
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable,
        network: torch.nn.Module,
        device: str | torch.device,
        inferer: Any,
        postprocessing: Callable | None,
        batch_size: int,
        output_dir: PathLike,
        extra_keys: Sequence[str] = ("input_ids", "attention_mask"),
        seed: int = 0,
        conditions: Sequence[str] = ("permuted", "none"),
        text_key: str = "text",
        summary_filename: str = "summary.json",
        num_workers: int = 0,
    ) -> None:
        unknown = sorted(set(conditions) - {"permuted", "none"})
        if unknown:
            raise ValueError(f"conditions must be among 'permuted' and 'none', got {unknown}.")
        self.data = list(data)
        self.transform = transform
        self.network = network
        self.device = torch.device(device)
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.batch_size = int(batch_size)
        self.output_dir = Path(output_dir)
        self.extra_keys = list(extra_keys)
        self.seed = int(seed)
        self.conditions = tuple(conditions)
        self.text_key = text_key
        self.summary_filename = summary_filename
        self.num_workers = int(num_workers)
        self.results: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the evaluator of the matched reports.
        """
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def _evaluate(self, items: list[dict], prepare_batch: Callable) -> dict[str, Any]:
        from monai.data import DataLoader, Dataset
        from monai.engines import SupervisedEvaluator

        additional = segmentation_metrics()
        key_metric = {"val_mean_dice": additional.pop("val_mean_dice")}
        loader = DataLoader(
            Dataset(items, transform=self.transform),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
        evaluator = SupervisedEvaluator(
            device=self.device,
            val_data_loader=loader,
            network=self.network,
            inferer=self.inferer,
            prepare_batch=prepare_batch,
            postprocessing=self.postprocessing,
            key_val_metric=key_metric,
            additional_metrics=additional,
        )
        evaluator.run()
        return condition_scores(evaluator)

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: the evaluator of the matched reports, at ``COMPLETED``.
        """
        results: dict[str, Any] = {"matched": condition_scores(engine)}
        permuted_items = permute_reports(self.data, self.seed, self.text_key)
        same_text = sum(
            str(item[self.text_key]) == str(original[self.text_key])
            for item, original in zip(permuted_items, self.data)
        )
        if "permuted" in self.conditions:
            results["permuted"] = self._evaluate(permuted_items, PrepareBatchExtraInput(self.extra_keys))
            results["permuted"].update(seed=self.seed, n_same_text=same_text)
        if "none" in self.conditions:
            results["none"] = self._evaluate(self.data, PrepareBatchReportNoise(self.extra_keys, drop_prob=1.0))
        self.results = results

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        n_images = results["matched"]["n_images"]
        logger.info(
            "What the report does, on the same %d images (permuted: seed %d, %d images got a report with their own "
            "text):",
            n_images,
            self.seed,
            same_text,
        )
        for name, scores in results.items():
            logger.info(
                "  %-8s report: Dice %s ± %s, IoU %s ± %s (mean ± std); global Dice %s, global IoU %s",
                name,
                fmt(scores["dice_mean"]),
                fmt(scores["dice_std"]),
                fmt(scores["iou_mean"]),
                fmt(scores["iou_std"]),
                fmt(scores["global_dice"]),
                fmt(scores["global_iou"]),
            )
        path = self.output_dir / self.summary_filename
        summary: dict[str, Any] = {}
        if path.is_file():
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("%s is not valid JSON; it is replaced by the report conditions alone.", path)
        summary["report_conditions"] = results
        write_text_atomically(path, json.dumps(summary, indent=2))
