"""
Overlays of predictions for text-guided lesion segmentation.

- :py:func:`overlay_prediction` / :py:func:`save_overlay`: grey image with true positives in yellow, false
  negatives in red and false positives in green (the colours of the HiMix paper, Fig. 4), or the prediction
  alone in one colour when there is no label.
- :py:class:`OverlaySaver`: ignite handler that writes one overlay PNG per image during evaluation.

The per-image metric files of evaluation are written by
:py:class:`himix_monai.handlers.SegmentationMetricsSaver` (MONAI's ``MetricsSaver``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monai.config import NdarrayOrTensor, PathLike
from monai.data import decollate_batch
from monai.utils import IgniteInfo, convert_to_numpy, min_version, optional_import

from himix_monai.files import atomic_path, file_stem
from himix_monai.transforms.mask import meta_filename

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
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
