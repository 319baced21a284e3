"""
Text transforms for text-guided segmentation.

- :py:class:`TokenizeTextd` turns the ``"text"`` entry of a datalist item into the ``input_ids`` and
  ``attention_mask`` tensors the HiMix network takes as its extra inputs.
- :py:class:`TextPromptToMetad` carries a client's text prompt (MONAI Label's ``text_prompt`` option) from the
  data dictionary to the image's metadata, as plain text, for :py:class:`~himix_monai.inferers.TextPromptInferer`.
- :py:class:`ReportStyleTextd` and :py:func:`to_report_style` rewrite the structured QaTa-COV19 /
  MosMedData+ prompts into free-text radiology-report form ("FINDINGS: ... IMPRESSION: ..."), the text
  augmentation of the HiMix paper (Fig. 8, supplement Figs. 9-10).

Tokenizers are loaded with :py:func:`himix_monai.tokenizers.load_text_tokenizer`, the loader
of the network's text encoder, so data and network read the same vocabulary (CXR-BERT without remote code).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from himix_monai.transforms.mask import source_name

__all__ = [
    "TokenizeTextd",
    "TextPromptToMetad",
    "PROMPT_META_KEY",
    "to_report_style",
    "ReportStyleTextd",
    "CHEST_FILLER_SENTENCES",
    "GENERIC_FILLER_SENTENCES",
]

logger = logging.getLogger(__name__)


class TokenizeTextd(MapTransform):
    """
    Tokenise the text of a datalist item into fixed-length ``input_ids`` and ``attention_mask`` tensors.

    The outputs are 1-D ``torch.long`` tensors of length ``max_length`` (padded to ``max_length`` and
    truncated), so that default collation gives ``(B, max_length)``, the shape the HiMix network and
    ``PrepareBatchExtraInput(extra_keys=["input_ids", "attention_mask"])`` expect.

    The tokenizer is loaded on first use and kept on the instance. When the transform is pickled (e.g. for
    DataLoader workers started with ``spawn``) a tokenizer that was loaded from a name or directory is not
    pickled: each worker loads it again. A tokenizer given as an instance is pickled with the transform.

    Text longer than ``max_length`` tokens is truncated; the first truncation is logged as a warning once per
    transform instance (once per DataLoader worker process), later ones are not reported.

    A text the tokenizer cannot read (e.g. Chinese or emoji for an English vocabulary) becomes mostly the
    unknown token (``[UNK]``) and gives the network almost no information, silently. When more than
    ``max_unknown_fraction`` of a text's tokens are unknown, a warning names the item, the counts and what to
    do, once per item and transform instance.

    Args:
        keys: the key of the text in the data dictionary (exactly one key), usually ``"text"``.
        tokenizer: hub name, local tokenizer directory (loaded with ``load_text_tokenizer``, the network's
            tokenizer loader), or a tokenizer instance (any callable with the Hugging Face tokenizer API).
        max_length: number of tokens including the special tokens; default 24 as in the HiMix code.
        input_ids_key: output key of the token ids.
        attention_mask_key: output key of the attention mask.
        empty_text: ``"error"`` raises ``ValueError`` naming the item's image when the text is empty or only
            whitespace; ``"allow"`` tokenises it (giving only the special tokens).
        max_unknown_fraction: warn when more than this fraction of a text's tokens are the tokenizer's unknown
            token; None never warns.
        allow_missing_keys: don't raise an exception if the text key is missing.

    Examples::

        from himix_monai.transforms.text import TokenizeTextd

        tokenize = TokenizeTextd(keys="text", tokenizer="/models/all-MiniLM-L6-v2", max_length=24)
        out = tokenize({"image": "img.png", "text": "Bilateral pulmonary infection, two infected areas."})
        out["input_ids"].shape, out["attention_mask"].dtype  # (torch.Size([24]), torch.int64)

    """

    def __init__(
        self,
        keys: KeysCollection,
        tokenizer: Any,
        max_length: int = 24,
        input_ids_key: str = "input_ids",
        attention_mask_key: str = "attention_mask",
        empty_text: str = "error",
        max_unknown_fraction: float | None = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"TokenizeTextd tokenises one text key, got keys={self.keys}.")
        if tokenizer is None:
            raise TypeError("TokenizeTextd needs a tokenizer: a hub name, a local directory or an instance.")
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2 (room for the special tokens), got {max_length}.")
        if empty_text not in ("error", "allow"):
            raise ValueError(f"empty_text must be 'error' or 'allow', got {empty_text!r}.")
        self.tokenizer_source = tokenizer
        self.max_length = int(max_length)
        self.input_ids_key = input_ids_key
        self.attention_mask_key = attention_mask_key
        self.empty_text = empty_text
        self._tokenizer: Any = None if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.max_unknown_fraction = max_unknown_fraction
        self._truncation_warned = False
        self._unknown_warned: set[str] = set()

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer, loaded on first access."""
        if self._tokenizer is None:
            # imported here: the transform is unpickled in DataLoader workers before any tokenizer is needed
            from himix_monai.tokenizers import load_text_tokenizer

            self._tokenizer = load_text_tokenizer(self.tokenizer_source)
        return self._tokenizer

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(self.tokenizer_source, (str, os.PathLike)):
            state["_tokenizer"] = None  # reloaded lazily in the receiving process
        return state

    def tokenize(self, text: str, source: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Tokenise one text.

        Args:
            text: the text.
            source: a name of the item for error and log messages (e.g. its image path).

        Returns:
            ``(input_ids, attention_mask)``, each a 1-D ``torch.long`` tensor of length ``max_length``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text of item {source!r} must be a str, got {type(text).__name__}.")
        if not text.strip() and self.empty_text == "error":
            raise ValueError(
                f"empty text for item {source!r}; give every item a text, or use empty_text='allow'."
            )
        tok = self.tokenizer
        if not self._truncation_warned or self.max_unknown_fraction is not None:
            ids = tok(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
            self._check_unknown(ids, text, source)
            specials = tok.num_special_tokens_to_add() if hasattr(tok, "num_special_tokens_to_add") else 2
            n_tokens = len(ids) + int(specials)
            if n_tokens > self.max_length and not self._truncation_warned:
                self._truncation_warned = True
                logger.warning(
                    "text of item %r has %d tokens and is truncated to max_length=%d "
                    "(further truncations by this transform are not reported).",
                    source,
                    n_tokens,
                    self.max_length,
                )
        encoded = tok(
            text,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_token_type_ids=False,
        )
        input_ids = torch.as_tensor(encoded["input_ids"], dtype=torch.long)
        attention_mask = torch.as_tensor(encoded["attention_mask"], dtype=torch.long)
        return input_ids, attention_mask

    def _check_unknown(self, ids: Sequence[int], text: str, source: Any) -> None:
        """Warn, once per item, when most of ``ids`` are the tokenizer's unknown token."""
        unknown_id = getattr(self.tokenizer, "unk_token_id", None)
        if self.max_unknown_fraction is None or unknown_id is None or not ids:
            return
        n_unknown = sum(1 for i in ids if i == unknown_id)
        if n_unknown <= self.max_unknown_fraction * len(ids):
            return
        name = str(source)
        if name in self._unknown_warned:
            return
        if len(self._unknown_warned) < 100_000:
            self._unknown_warned.add(name)
        unknown = getattr(self.tokenizer, "unk_token", None) or "unknown"
        logger.warning(
            "text of item %r is mostly unreadable for the text encoder's tokenizer: %d of %d tokens are %s, so "
            "the network gets almost no information from it (text: %r). Write the text in the language and "
            "characters of the tokenizer's vocabulary (English for the bundle's default MiniLM and CXR-BERT), or "
            "choose a text_encoder that reads it.",
            source,
            n_unknown,
            len(ids),
            unknown,
            text if len(text) <= 80 else text[:77] + "...",
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = source_name(d["image"], d, "image") if "image" in d else None
            d[self.input_ids_key], d[self.attention_mask_key] = self.tokenize(d[key], source=source)
        return d


# the image metadata key under which TextPromptToMetad leaves a client's prompt for TextPromptInferer
PROMPT_META_KEY = "text_prompt"


class TextPromptToMetad(MapTransform):
    """
    Carry a client's text prompt from the data dictionary to the image's metadata, as plain text.

    Why: a MONAI Label request's options (the ``text_prompt`` a Slicer or OHIF user types) arrive twice: MONAI
    Label writes them into the bundle config's ``displayable_configs`` and parses the config again, and it
    merges them into the data dictionary that flows through the pre-transforms. Any config entry that
    *references* such a value makes MONAI's parser evaluate it (a ``$``-string is Python), so the bundle's
    configs never reference ``displayable_configs``; the prompt is taken here from ``data[prompt_key]``, the
    string the client sent, and put into ``data[keys].meta[meta_key]``. MONAI Label calls the inferer with the
    image tensor only (``inferer(data["image"][None], network)``), and the metadata travels with that tensor,
    per request: no object shared between requests holds the prompt.

    A missing, None, empty or whitespace-only prompt means no report (nothing is stored). Any other value that
    is not a string (a number, a list, a JSON object) is refused with an error naming the key and what was
    sent. A string is never interpreted: ``$...``, ``@...``, ``%...`` or JSON reach the tokenizer as the
    characters they are.

    Args:
        keys: the image key(s); each must be a ``MetaTensor`` (after ``LoadImaged``).
        prompt_key: the data key of the client's prompt.
        meta_key: the metadata key to store it under (:py:data:`PROMPT_META_KEY`, read by ``TextPromptInferer``).
        allow_missing_keys: don't raise an exception if an image key is missing.

    Examples::

        from himix_monai.transforms import TextPromptToMetad

        data = TextPromptToMetad(keys="image")({"image": image, "text_prompt": "one lesion, upper left lung."})
        data["image"].meta["text_prompt"]  # 'one lesion, upper left lung.'

    """

    def __init__(
        self,
        keys: KeysCollection,
        prompt_key: str = "text_prompt",
        meta_key: str = PROMPT_META_KEY,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prompt_key = prompt_key
        self.meta_key = meta_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prompt = d.get(self.prompt_key)
        if prompt is None:
            return d
        if not isinstance(prompt, str):
            shown = repr(prompt)
            raise TypeError(
                f"{self.prompt_key} must be text (the report as a string), got {type(prompt).__name__} "
                f"{shown if len(shown) <= 80 else shown[:77] + '...'}; send the report as a JSON string, or leave "
                f"{self.prompt_key} empty for no report."
            )
        if not prompt.strip():
            return d
        for key in self.key_iterator(d):
            image = d[key]
            if not hasattr(image, "meta"):
                raise TypeError(
                    f"TextPromptToMetad: {key!r} must be a MetaTensor (put the transform after LoadImaged), "
                    f"got {type(image).__name__}."
                )
            image.meta[self.meta_key] = prompt
        return d


# Sentences of a normal chest radiograph report (MIMIC-CXR style); the first four are those of the paper's
# augmented text (supplement Fig. 9), including its "no focal consolidation" sentence.
CHEST_FILLER_SENTENCES: tuple[str, ...] = (
    "There is no focal consolidation, effusion, or pneumothorax.",
    "The cardiomediastinal silhouette is normal.",
    "Imaged osseous structures are intact.",
    "No free air below the right hemidiaphragm is seen.",
    "Heart size is within normal limits.",
    "The hilar contours are unremarkable.",
    "No pleural effusion is identified.",
    "The mediastinal contours are stable.",
)

# Modality-neutral sentences for texts that are not chest infection prompts (e.g. Kvasir polyp prompts).
GENERIC_FILLER_SENTENCES: tuple[str, ...] = (
    "Image quality is adequate for interpretation.",
    "No other abnormality is identified.",
    "The remaining visualised structures are unremarkable.",
    "Comparison with prior studies is not available.",
)

_OPENING_SENTENCES: tuple[str, ...] = (
    "The lungs are well aerated.",
    "Frontal view of the chest was obtained.",
    "The lungs are clearly visualised.",
)

_LOCATION_TEMPLATES: tuple[str, ...] = (
    "From {locations}...",
    "The infection involves {locations}.",
    "Opacities are seen in {locations}.",
)

_STRUCTURED_PROMPT = re.compile(
    r"^\s*(?P<laterality>bilateral|unilateral)\s+pulmonary\s+infections?\s*"
    r"(?:,\s*(?P<count>[\w-]+)\s+infected\s+areas?\s*)?"
    r"(?:,\s*(?P<locations>[^.]*?))?\s*\.?\s*$",
    flags=re.IGNORECASE,
)

_SINGULAR_COUNTS = {"one", "1", "a", "single"}


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _pick(pool: Sequence[str], low: int, high: int, rng: np.random.RandomState) -> list[str]:
    """``low..high`` distinct sentences of ``pool`` in random order."""
    if not pool:
        return []
    high = min(high, len(pool))
    low = min(low, high)
    n = int(rng.randint(low, high + 1))
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def to_report_style(
    text: str,
    rng: np.random.RandomState | None = None,
    chest_fillers: Sequence[str] = CHEST_FILLER_SENTENCES,
    generic_fillers: Sequence[str] = GENERIC_FILLER_SENTENCES,
) -> str:
    """
    Rewrite a structured prompt as a free-text radiology report, keeping its content.

    A QaTa-COV19 / MosMedData+ prompt ``"<Bilateral|Unilateral> pulmonary infection, <count> infected
    area(s), <locations>."`` becomes, for example (paper, supplement Fig. 9)::

        FINDINGS: The lungs are well aerated. There are two infected areas. There is no focal consolidation,
        effusion, or pneumothorax. From all left lung and all right lung... The cardiomediastinal silhouette
        is normal. IMPRESSION: 1. Bilateral pulmonary infection.

    The opening sentence, the wording of the location sentence and 2-4 filler sentences (from
    ``chest_fillers``, in random order, around the location sentence) are drawn from ``rng``; the
    laterality, the count and the locations are kept verbatim. Any other text (e.g. a Kvasir polyp prompt) is
    wrapped generically: ``"FINDINGS: <text> <0-2 generic fillers> IMPRESSION: 1. <text>"``.

    The result is several times longer than the prompt: raise ``TokenizeTextd(max_length=...)`` (e.g. to
    96 or 128) when tokenising report-style text, otherwise the counts and locations are truncated away.

    Args:
        text: the structured prompt.
        rng: random state; ``None`` uses a fresh ``np.random.RandomState()`` (not reproducible).
        chest_fillers: filler sentences for chest infection prompts.
        generic_fillers: filler sentences for other texts.

    Returns:
        the report-style text, on one line.
    """
    rng = np.random.RandomState() if rng is None else rng
    match = _STRUCTURED_PROMPT.match(text)
    if match is None:
        body = _sentence(text)
        fillers = _pick(generic_fillers, 0, 2, rng)
        findings = " ".join([body, *fillers])
        return f"FINDINGS: {findings} IMPRESSION: 1. {body}"

    laterality = match.group("laterality").capitalize()
    count = match.group("count")
    locations = (match.group("locations") or "").strip()
    findings = [_OPENING_SENTENCES[int(rng.randint(len(_OPENING_SENTENCES)))]]
    if count:
        if count.lower() in _SINGULAR_COUNTS:
            findings.append(f"There is {count.lower()} infected area.")
        else:
            findings.append(f"There are {count.lower()} infected areas.")
    fillers = _pick(chest_fillers, 2, 4, rng)
    split = int(rng.randint(0, len(fillers) + 1))
    findings.extend(fillers[:split])
    if locations:
        template = _LOCATION_TEMPLATES[int(rng.randint(len(_LOCATION_TEMPLATES)))]
        findings.append(template.format(locations=locations))
    findings.extend(fillers[split:])
    return f"FINDINGS: {' '.join(findings)} IMPRESSION: 1. {laterality} pulmonary infection."


class ReportStyleTextd(RandomizableTransform, MapTransform):
    """
    Randomly rewrite structured prompts into free-text radiology-report form (see :py:func:`to_report_style`).

    This is the text augmentation of the HiMix paper (Fig. 8): the structured QaTa-COV19 / MosMedData+
    prompt keeps its laterality, count and locations inside a MIMIC-CXR-like report with random filler
    sentences. Seed it with ``set_random_state(seed)`` (or through ``Compose.set_random_state``) for a
    reproducible rewrite. Use a larger ``TokenizeTextd(max_length=...)`` after it.

    Args:
        keys: keys of the texts to rewrite, usually ``"text"``.
        prob: probability of rewriting an item (one draw per item, shared by all keys).
        chest_fillers: filler sentences for chest infection prompts.
        generic_fillers: filler sentences for other texts.
        allow_missing_keys: don't raise an exception if a key is missing.

    Examples::

        from himix_monai.transforms.text import ReportStyleTextd

        rewrite = ReportStyleTextd(keys="text", prob=1.0).set_random_state(seed=0)
        rewrite({"text": "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."})
        # {"text": "FINDINGS: The lungs are well aerated. There are two infected areas. ... IMPRESSION: 1. ..."}

    """

    def __init__(
        self,
        keys: KeysCollection = "text",
        prob: float = 1.0,
        chest_fillers: Sequence[str] = CHEST_FILLER_SENTENCES,
        generic_fillers: Sequence[str] = GENERIC_FILLER_SENTENCES,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.chest_fillers = tuple(chest_fillers)
        self.generic_fillers = tuple(generic_fillers)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ReportStyleTextd:
        super().set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = to_report_style(d[key], self.R, self.chest_fillers, self.generic_fillers)
        return d
