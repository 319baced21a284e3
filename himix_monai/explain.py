"""
Word-to-region maps: which words of the report drove which part of the predicted mask (issue 16).

- :py:func:`explain`: for one image and its tokenised report, one map over the image per word of the report
  (tokens merged back into words), one map per decoder stage (the whole report at that stage), one map per
  word and stage, and the report's total effect (:py:class:`WordMaps`).
- :py:func:`group_words`: the tokens of a tokenised report grouped into words (fast tokenizers' ``word_ids``
  and offsets).
- :py:func:`render_word_maps` / :py:func:`save_word_maps`: a PNG grid (the image with the mask outline, then
  one heat map per word titled with the word, then one per stage) and the raw maps as ``.npz``.
- :py:class:`WordMapSaver`: ignite handler writing both for every image an evaluator processes (the bundle's
  ``inference.json --explain true``).

**The attribution: occlusion of a word's stage inputs.** A map is the change of the mask logits when the
word is removed: ``map_w = logits(report) - logits(report without w)``, per pixel, at the network's input
resolution. "Removed" means the word's rows of the per-stage text embeddings ``t_m`` (the outputs of DLFM,
Eq. 1, that feed the token projection of Eq. 2) are zeroed; that is exactly what the network does with
padding (``HiMix.encode_text`` zeroes padded tokens), so the network is never fed an input it was not trained
with. Positive values: the word pushed that pixel towards "lesion"; negative: away from it. Units are logits.

Why occlusion and not the two alternatives:

- *Attention carried back through the projection* (exact per input for the active ReLU units of Eq. 2) tells
  where each projected token is attended, not what that did to the mask: the post-attention LayerNorm (Eq. 4),
  self-attention (Eq. 5), MLP (Eq. 6), the up blocks and the head all lie between the attention and the mask,
  and a word attended everywhere can still change nothing.
- *Gradient x input* over the token embeddings is a first-order estimate through three LayerNorms, two
  softmaxes and the ReLUs, and gives one number per token unless run once per pixel region.
- Occlusion measures the effect on the mask itself, per pixel and per stage, with no approximation. Its cost is
  one decoder pass per (word, stage) variant; the image encoder and the text encoder run once, and the
  variants are batched through the decoder. The words are removed *after* the (contextual) text encoder, so a
  map is what the word's own slot carried into the decoder, not a re-reading of a changed sentence.

The explanation recomputes everything on its own path; ordinary inference (``HiMix.forward``, the fast SDPA
attention) is not changed or slowed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from monai.config import PathLike
from monai.data import MetaTensor, decollate_batch
from monai.utils import IgniteInfo, convert_to_numpy, min_version, optional_import

from himix_monai.files import file_stem, write_new_file
from himix_monai.networks.blocks.head import subpixel_segmentation_head
from himix_monai.tokenizers import load_text_tokenizer
from himix_monai.transforms.mask import meta_filename
from himix_monai.visualize import overlay_prediction

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "WordMaps",
    "group_words",
    "explain",
    "explain_stage_texts",
    "render_word_maps",
    "save_word_maps",
    "WordMapSaver",
]

logger = logging.getLogger(__name__)


@dataclass
class WordMaps:
    """The explanation of one image + report (all maps in logits at the network's input resolution).

    Attributes:
        words: the report's words in order (special tokens such as ``[CLS]`` are not words).
        token_indices: for each word, the token positions (in ``input_ids``) it was made of.
        word_maps: ``(num_words, H, W)``: ``logits - logits(without the word in every stage)``.
        stage_maps: ``(num_stages, H, W)``: ``logits - logits(without any token at that stage)``, coarsest
            stage first: what the whole report did through that stage.
        word_stage_maps: ``(num_words, num_stages, H, W)``: the word removed from one stage only.
        report_map: ``(H, W)``: ``logits - logits(without any token at any stage)``.
        logits: ``(H, W)``: the prediction's logits (first output channel).
        mask: ``(H, W)`` bool, ``logits > 0`` (sigmoid > 0.5).
    """

    words: list[str]
    token_indices: list[list[int]]
    word_maps: np.ndarray
    stage_maps: np.ndarray
    word_stage_maps: np.ndarray
    report_map: np.ndarray
    logits: np.ndarray
    mask: np.ndarray = field(repr=False)


def _is_fast(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def group_words(
    tokenizer: Any, input_ids: Sequence[int] | torch.Tensor, attention_mask: Sequence[int] | torch.Tensor | None = None,
    text: str | None = None,
) -> tuple[list[str], list[list[int]]]:
    """
    The words of a tokenised report and the token positions of each.

    With ``text`` (the report that was tokenised) and a fast tokenizer, the words and their spellings come from
    the tokenizer's ``word_ids`` and character offsets of that text; the token ids must be those of
    ``input_ids`` (else ``ValueError``: the tokenizer is not the one that made them). Without ``text``, the
    text is decoded from the ids and tokenised again the same way; if that does not give the same ids, tokens
    are grouped by WordPiece continuation (``##``). Special and padded tokens belong to no word.

    Args:
        tokenizer: the text encoder's Hugging Face tokenizer (instance, local directory or hub name).
        input_ids: ``(L,)`` token ids.
        attention_mask: ``(L,)``, 1 for real tokens; default all real.
        text: the report the ids were made from, if known.

    Returns:
        ``(words, token_indices)``.

    Examples::

        words, tokens = group_words(tokenizer, item["input_ids"], item["attention_mask"], item["text"])
    """
    tokenizer = load_text_tokenizer(tokenizer)
    ids = [int(i) for i in convert_to_numpy(input_ids).reshape(-1)]
    keep = [1] * len(ids) if attention_mask is None else [int(m) for m in convert_to_numpy(attention_mask).reshape(-1)]
    if len(keep) != len(ids):
        raise ValueError(f"attention_mask has {len(keep)} entries, input_ids {len(ids)}.")
    real = [i for i, k in enumerate(keep) if k]
    special = set(getattr(tokenizer, "all_special_ids", []))
    if _is_fast(tokenizer):
        candidate = text
        if candidate is None:
            candidate = tokenizer.decode([ids[i] for i in real], skip_special_tokens=True)
        encoded = tokenizer(
            candidate, max_length=len(ids), truncation=True, padding="max_length", return_offsets_mapping=True
        )
        same = [int(i) for i in encoded["input_ids"]] == ids
        if not same and text is not None:
            raise ValueError(
                f"the text {text!r} does not tokenise to the given input_ids with this tokenizer; pass the "
                "tokenizer that made them (the text encoder's) and the same max_length."
            )
        if same:
            word_of = encoded.word_ids()
            offsets = encoded["offset_mapping"]
            words: list[str] = []
            tokens: list[list[int]] = []
            last: int | None = None
            for position, word in enumerate(word_of):
                if word is None or not keep[position] or ids[position] in special:
                    last = None
                    continue
                if word != last:
                    tokens.append([])
                    words.append("")
                tokens[-1].append(position)
                last = word
            for index, positions in enumerate(tokens):
                words[index] = candidate[offsets[positions[0]][0] : offsets[positions[-1]][1]]
            return words, tokens
    # fallback: WordPiece continuation marks
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words, tokens = [], []
    for position in real:
        if ids[position] in special:
            continue
        piece = pieces[position]
        if piece.startswith("##") and tokens and tokens[-1][-1] == position - 1:
            tokens[-1].append(position)
            words[-1] += piece[2:]
        else:
            tokens.append([position])
            words.append(piece)
    return words, tokens


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _decode(network: torch.nn.Module, features: Sequence[torch.Tensor], texts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``HiMix.forward`` after the encoders: the decoder stages and the head, for a batch of text variants."""
    batch = texts[0].shape[0]
    features = [f.expand(batch, *f.shape[1:]) for f in features]
    decoded = features[-1]
    for index, stage in enumerate(network.stages):
        decoded = stage(decoded, features[len(features) - 2 - index], texts[index])
    return subpixel_segmentation_head(decoded, network.head_upsample, network.head)


def explain_stage_texts(
    network: torch.nn.Module,
    image: torch.Tensor,
    stage_texts: Sequence[torch.Tensor],
    token_indices: Sequence[Sequence[int]],
    words: Sequence[str] | None = None,
    chunk_size: int = 8,
    word_stages: bool = True,
) -> WordMaps:
    """
    The occlusion maps (see the module docstring) from given per-stage text embeddings.

    This is the core of :py:func:`explain`, for callers that have the stage inputs ``t_m`` already (or want
    to set them by hand, as the unit test does).

    Args:
        network: a :py:class:`~himix_monai.networks.HiMix` built with a text encoder.
        image: ``(C, H, W)`` or ``(1, C, H, W)``, preprocessed as for the network.
        stage_texts: one ``(L, C_P)`` or ``(1, L, C_P)`` tensor per decoder stage, coarsest first
            (``network.encode_text(...)``).
        token_indices: for each word, the token rows that make it.
        words: the words (default ``"token <i>"`` names).
        chunk_size: text variants decoded per batch.
        word_stages: also remove each word from each stage alone (``word_stage_maps``; ``num_words *
            num_stages`` more decoder passes); False leaves ``word_stage_maps`` empty ``(num_words, 0, H, W)``.

    Returns:
        :py:class:`WordMaps`.
    """
    if getattr(network, "stages", None) is None or getattr(network, "text_encoder", None) is None:
        raise ValueError("explain needs a HiMix network built with a text encoder (text_encoder=None has no words).")
    image = _plain(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"explain takes one image, (C, H, W) or (1, C, H, W); got shape {list(image.shape)}.")
    texts = [_plain(t)[None] if t.ndim == 2 else _plain(t) for t in stage_texts]
    num_stages = len(network.stages)
    if len(texts) != num_stages or any(t.ndim != 3 or t.shape[0] != 1 for t in texts):
        shapes = [list(t.shape) for t in texts]
        raise ValueError(f"stage_texts needs {num_stages} tensors of shape (1, L, C); got {shapes}.")
    length = texts[0].shape[1]
    for positions in token_indices:
        if not positions or any(p < 0 or p >= length for p in positions):
            raise ValueError(f"token_indices {list(positions)} out of range for {length} tokens.")
    words = list(words) if words is not None else [f"token {positions[0]}" for positions in token_indices]
    if len(words) != len(token_indices):
        raise ValueError(f"{len(words)} words but {len(token_indices)} token groups.")
    num_words = len(words)
    decoder_weight = next(network.stages.parameters())  # the text encoder may be stored in another dtype
    dtype, device = decoder_weight.dtype, decoder_weight.device
    image = image.to(device=device, dtype=dtype)
    texts = [t.to(device=device, dtype=dtype) for t in texts]

    # the variants: keep[v, s, l] = 0 removes token l from stage s in variant v
    variants = []
    full = torch.ones(num_stages, length, device=device, dtype=dtype)
    variants.append(full)
    for positions in token_indices:  # each word from every stage
        keep = full.clone()
        keep[:, list(positions)] = 0
        variants.append(keep)
    per_word_stages = num_stages if word_stages else 0
    for positions in token_indices:  # each word from one stage
        for stage in range(per_word_stages):
            keep = full.clone()
            keep[stage, list(positions)] = 0
            variants.append(keep)
    for stage in range(num_stages):  # the whole report from one stage
        keep = full.clone()
        keep[stage] = 0
        variants.append(keep)
    variants.append(torch.zeros_like(full))  # the whole report from every stage
    keeps = torch.stack(variants)  # (V, S, L)

    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            features = [_plain(f) for f in network.image_encoder(image)]
            outputs = []
            for start in range(0, keeps.shape[0], chunk_size):
                chunk = keeps[start : start + chunk_size]
                stage_inputs = [texts[s] * chunk[:, s, :, None] for s in range(num_stages)]
                outputs.append(_decode(network, features, stage_inputs)[:, 0].float().cpu())
            logits = torch.cat(outputs).numpy()  # (V, H, W)
    finally:
        network.train(was_training)
    base = logits[0]
    effect = base[None] - logits
    word_maps = effect[1 : 1 + num_words]
    offset = 1 + num_words
    word_stage_maps = effect[offset : offset + num_words * per_word_stages].reshape(
        num_words, per_word_stages, *base.shape
    )
    offset += num_words * per_word_stages
    stage_maps = effect[offset : offset + num_stages]
    return WordMaps(
        words=words,
        token_indices=[list(p) for p in token_indices],
        word_maps=np.ascontiguousarray(word_maps),
        stage_maps=np.ascontiguousarray(stage_maps),
        word_stage_maps=np.ascontiguousarray(word_stage_maps),
        report_map=np.ascontiguousarray(effect[-1]),
        logits=base,
        mask=base > 0,
    )


def explain(
    network: torch.nn.Module,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    tokenizer: Any,
    text: str | None = None,
    chunk_size: int = 8,
    word_stages: bool = True,
) -> WordMaps:
    """
    Word-to-region maps for one image and its tokenised report (occlusion of each word's stage inputs; see the
    module docstring for what a map means and why this attribution).

    Args:
        network: a :py:class:`~himix_monai.networks.HiMix` with a text encoder (in eval mode for inference).
        image: ``(C, H, W)`` or ``(1, C, H, W)``, preprocessed as for the network.
        input_ids: ``(L,)`` or ``(1, L)`` token ids (``TokenizeTextd``).
        attention_mask: ``(L,)`` or ``(1, L)``, or None (all real).
        tokenizer: the text encoder's tokenizer (instance, local directory or hub name).
        text: the report, for the words' exact spelling (optional).
        chunk_size: text variants decoded per batch.
        word_stages: also compute each word's map per stage (see :py:func:`explain_stage_texts`).

    Returns:
        :py:class:`WordMaps` (maps in logits, at the image's size).

    Examples::

        from himix_monai.explain import explain, render_word_maps
        item = preprocessing({"image": "case.nii.gz", "text": report})
        maps = explain(network, item["image"], item["input_ids"], item["attention_mask"], tokenizer, report)
        maps.words, maps.word_maps.shape        # ['bilateral', 'pulmonary', ...], (num_words, H, W)
        rgb = render_word_maps(item["image"], maps)  # the PNG grid as an (h, w, 3) uint8 array
    """
    ids = _plain(torch.as_tensor(input_ids)).reshape(1, -1).long()
    mask = torch.ones_like(ids)
    if attention_mask is not None:
        mask = _plain(torch.as_tensor(attention_mask)).reshape(1, -1).long()
    words, token_indices = group_words(tokenizer, ids[0], mask[0], text)
    device = next(network.parameters()).device
    with torch.no_grad():
        texts = network.encode_text(ids.to(device), mask.to(device))
    if texts is None:
        raise ValueError("explain needs a HiMix network built with a text encoder (text_encoder=None has no words).")
    return explain_stage_texts(
        network, image, texts, token_indices, words, chunk_size=chunk_size, word_stages=word_stages
    )


# --- pictures ---------------------------------------------------------------------------------------------------

_POSITIVE = np.array([220.0, 30.0, 30.0])  # red: the word pushed towards "lesion"
_NEGATIVE = np.array([30.0, 90.0, 230.0])  # blue: away from it
_OUTLINE = np.array([0.0, 255.0, 255.0])  # cyan: the predicted mask's boundary


def _heat_tile(grey_rgb: np.ndarray, values: np.ndarray, scale: float, outline: np.ndarray) -> np.ndarray:
    strength = np.clip(np.abs(values) / scale, 0.0, 1.0)[..., None] if scale > 0 else np.zeros((*values.shape, 1))
    colour = np.where(values[..., None] >= 0, _POSITIVE, _NEGATIVE)
    tile = (1 - strength) * (0.6 * grey_rgb) + strength * colour
    tile[outline] = _OUTLINE
    return np.clip(np.rint(tile), 0, 255).astype(np.uint8)


def render_word_maps(
    image: Any, maps: WordMaps, columns: int = 6, min_tile: int = 128, include_stages: bool = True
) -> np.ndarray:
    """
    The PNG grid of an explanation as an ``(h, w, 3)`` uint8 array.

    Tile 1: the image with the predicted mask's outline (cyan). Then one tile per word, titled with the word:
    the grey image darkened with the mask outline, red where the word pushed towards "lesion", blue where away,
    with opacity proportional to the effect; all word tiles share one scale (the largest absolute effect of any
    word, given in the first tile's title), so words can be compared. With ``include_stages`` one tile per decoder stage
    follows (the whole report at that stage, its own scale, given in the title).

    Args:
        image: ``(C, H, W)`` / ``(H, W)`` image the maps were computed on.
        maps: :py:class:`WordMaps`.
        columns: tiles per row.
        min_tile: tiles smaller than this are enlarged (nearest neighbour) to at least this many pixels.
        include_stages: add the per-stage tiles.
    """
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    image = convert_to_numpy(_plain(image) if isinstance(image, torch.Tensor) else image)
    outline = overlay_prediction(image, maps.mask.astype(np.float32), None, alpha=0.0)
    grey = overlay_prediction(image, np.zeros_like(maps.logits), None, alpha=0.0).astype(np.float64)
    boundary = find_boundaries(maps.mask, mode="inner")
    scale = float(np.abs(maps.word_maps).max()) if maps.word_maps.size else 0.0
    tiles: list[tuple[str, np.ndarray]] = [(f"mask; words +-{scale:.2g}", outline)]
    tiles += [(word, _heat_tile(grey, m, scale, boundary)) for word, m in zip(maps.words, maps.word_maps)]
    if include_stages:
        for index, m in enumerate(maps.stage_maps):
            stage_scale = float(np.abs(m).max())
            tiles.append((f"stage {index + 1} +-{stage_scale:.2g}", _heat_tile(grey, m, stage_scale, boundary)))
    height, width = outline.shape[:2]
    zoom = max(1, int(np.ceil(min_tile / max(1, min(height, width)))))
    tile_h, tile_w, title_h, pad = height * zoom, width * zoom, 14, 4
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (tile_h + title_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, (title, tile) in enumerate(tiles):
        x = pad + (index % columns) * (tile_w + pad)
        y = pad + (index // columns) * (tile_h + title_h + pad)
        draw.text((x, y), title[: max(4, tile_w // 6)], fill=(0, 0, 0))
        canvas.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST), (x, y + title_h))
    return np.asarray(canvas)


def save_word_maps(output_dir: PathLike, stem: str, image: Any, maps: WordMaps) -> tuple[Path, Path]:
    """
    Write ``<output_dir>/<stem>_words.png`` (:py:func:`render_word_maps`) and ``<stem>_words.npz`` (the raw
    maps: ``word_maps``, ``stage_maps``, ``word_stage_maps``, ``report_map``, ``logits``, ``mask`` and
    ``words`` / ``token_indices`` as JSON in ``meta``), atomically; an existing file is never replaced: the
    next free name ``<stem>_words_1.png`` ... is used and logged.

    Returns:
        the paths written (PNG, NPZ).
    """
    from PIL import Image

    output_dir = Path(output_dir)
    rgb = render_word_maps(image, maps)
    png = write_new_file(output_dir / f"{stem}_words.png", lambda f: Image.fromarray(rgb).save(f, format="PNG"))
    meta = json.dumps({"words": maps.words, "token_indices": maps.token_indices, "units": "logits",
                       "map": "logits(report) - logits(report without the word)"})  # fmt: skip
    arrays = {
        "word_maps": maps.word_maps, "stage_maps": maps.stage_maps, "word_stage_maps": maps.word_stage_maps,
        "report_map": maps.report_map, "logits": maps.logits, "mask": maps.mask, "meta": np.array(meta),
    }  # fmt: skip
    npz = write_new_file(png.with_suffix(".npz"), lambda f: np.savez_compressed(f, **arrays))
    if png.name != f"{stem}_words.png" or npz.stem != png.stem:
        logger.info("explanation files existed already; wrote %s and %s", png.name, npz.name)
    return png, npz


class WordMapSaver:
    """
    Ignite handler writing word-to-region maps (:py:func:`explain`, :py:func:`save_word_maps`) for every image
    an evaluator processes: ``<output_dir>/<image stem>_words.png`` and ``.npz``.

    It reads the network inputs from ``engine.state.batch`` (decollated by MONAI's evaluator, or a batch dict:
    ``image`` as preprocessed, ``input_ids``, ``attention_mask`` and, when present, ``text``); in a
    ``text_prompt`` run (the inferer replaces every report by the prompt) the prompt's tokens come from
    ``inferer.prompt_tokens()``. The maps are computed at the network's input size.
    Images without text are skipped with a warning. Nothing else of the evaluator's run is changed.

    Args:
        output_dir: folder of the files (created).
        network: the evaluated HiMix network.
        tokenizer: the text encoder's tokenizer (instance, local directory or hub name), loaded on first use.
        inferer: the evaluator's inferer, for the prompt tokens of a ``text_prompt`` run (optional).
        image_key, input_ids_key, attention_mask_key, text_key: keys in the batch.

    Examples::

        evaluator = SupervisedEvaluator(..., val_handlers=[WordMapSaver("eval/explanations", net, tokenizer_dir)])
    """

    def __init__(
        self,
        output_dir: PathLike,
        network: torch.nn.Module,
        tokenizer: Any,
        inferer: Any = None,
        image_key: Hashable = "image",
        input_ids_key: Hashable = "input_ids",
        attention_mask_key: Hashable = "attention_mask",
        text_key: Hashable = "text",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.network = network
        self.tokenizer_source = tokenizer
        self._tokenizer: Any = None
        self.inferer = inferer
        self.image_key = image_key
        self.input_ids_key = input_ids_key
        self.attention_mask_key = attention_mask_key
        self.text_key = text_key
        self.written: list[Path] = []

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
            engine: Ignite Engine whose ``state.batch`` holds the current batch.
        """
        batch = engine.state.batch
        if isinstance(batch, Mapping):  # decollate=False
            items = list(decollate_batch(batch, detach=True))
        elif isinstance(batch, (list, tuple)):  # MONAI decollates the batch after the model by default
            items = list(batch)
        else:
            return
        if self._tokenizer is None:
            self._tokenizer = load_text_tokenizer(self.tokenizer_source)
        prompt = getattr(self.inferer, "prompt_tokens", None)
        prompt_tokens = prompt() if callable(prompt) else None
        for index, item in enumerate(items):
            if not isinstance(item, Mapping) or self.image_key not in item:
                continue
            image = item[self.image_key]
            filename = meta_filename(item, self.image_key)
            stem = file_stem(filename) if filename else f"iter{engine.state.iteration}_{index}"
            ids, mask, text = item.get(self.input_ids_key), item.get(self.attention_mask_key), item.get(self.text_key)
            if prompt_tokens is not None:  # the inferer replaced the item's text by the prompt
                ids, mask, text = prompt_tokens[0][0], prompt_tokens[1][0], None
            if ids is None:
                logger.warning("WordMapSaver: %s has no report tokens; no word maps.", stem)
                continue
            text = text if isinstance(text, str) else None
            try:
                maps = explain(self.network, image, ids, mask, self._tokenizer, text)
            except ValueError:
                if text is None:
                    raise
                # the item's text was changed after tokenisation: take the words from the ids alone
                maps = explain(self.network, image, ids, mask, self._tokenizer, None)
            self.written.extend(save_word_maps(self.output_dir, stem, image, maps))


