"""
A random flip that keeps the report true: mirror the image and its mask and swap the direction words of the text.

A plain ``RandFlipd`` is wrong for text-guided segmentation: a polyp "located in right of the image" is on the left
after a horizontal flip, so the model would learn that "right" means either side. Kvasir-SEG's prompts name the
position of 62 % of the polyps (right 192 times, left 26 times in the training split), so a flip without the text
changed teaches the model to ignore exactly what the report adds.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import Flip, MapTransform, RandomizableTransform

from himix_monai.transforms.mask import source_name
from himix_monai.transforms.text import TokenizeTextd

__all__ = ["HORIZONTAL_WORDS", "VERTICAL_WORDS", "swap_direction_words", "RandFlipWithReportd"]

HORIZONTAL_WORDS: tuple[tuple[str, str], ...] = (("left", "right"),)
"""The words a horizontal mirror swaps (image sides; for a chest CT in radiological view also the patient's sides)."""

VERTICAL_WORDS: tuple[tuple[str, str], ...] = (("top", "bottom"), ("upper", "lower"))
"""The words a vertical mirror swaps."""


def swap_direction_words(text: str, word_pairs: Sequence[Sequence[str]]) -> str:
    """Swap each pair of whole words in ``text`` (``"left"`` <-> ``"right"``), keeping an initial capital or all
    capitals; parts of longer words (``"upright"``, ``"lefts"``) are left alone.

    Args:
        text: the report.
        word_pairs: the pairs of lower-case words to swap.

    Examples::

        >>> swap_direction_words("Left lung; lesion in top right, upright.", HORIZONTAL_WORDS + VERTICAL_WORDS)
        'Right lung; lesion in bottom left, upright.'
    """
    other = {}
    for first, second in word_pairs:
        other[first.lower()], other[second.lower()] = second.lower(), first.lower()
    if not other:
        return text

    def replace(match: re.Match) -> str:
        word = match.group(0)
        swapped = other[word.lower()]
        if word.isupper() and len(word) > 1:
            return swapped.upper()
        return swapped.capitalize() if word[0].isupper() else swapped

    pattern = r"\b(" + "|".join(re.escape(word) for word in sorted(other, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, replace, text, flags=re.IGNORECASE)


class RandFlipWithReportd(RandomizableTransform, MapTransform):
    """
    With probability ``prob``, mirror the image keys along ``spatial_axis`` (MONAI's ``Flip``) and swap the direction
    words of the report (:py:func:`swap_direction_words`), then tokenise the new report again with ``tokenize``
    (the item's ``TokenizeTextd``, so the tokens of a cached item follow the flip).

    In MONAI's layout of a loaded picture or NIfTI slice (``LoadImage`` gives ``(column, row)``), spatial axis 0 runs
    left to right: ``spatial_axis=0`` with :py:data:`HORIZONTAL_WORDS` is a left-right mirror, ``spatial_axis=1`` with
    :py:data:`VERTICAL_WORDS` an upside-down one. Only for training: use it when the reports name image or patient
    sides with these words and a mirrored image is still a plausible image (endoscopy; for CT a horizontal mirror
    puts the heart on the other side).

    Args:
        keys: the spatial keys to mirror, usually ``["image", "label"]``.
        text_key: the key of the report.
        tokenize: the ``TokenizeTextd`` whose output keys are written again from the new report; None leaves the
            tokens alone (tokenise after this transform then).
        prob: probability of flipping an item (one draw per item, shared by all keys).
        spatial_axis: the spatial axis to mirror.
        word_pairs: the words to swap in the report.
        allow_missing_keys: don't raise an exception if a key is missing.

    Examples::

        from himix_monai.transforms import RandFlipWithReportd

        flip = RandFlipWithReportd(["image", "label"], tokenize=tokenize_transform, prob=0.5)
        flip({"image": image, "label": label, "text": "polyp located in right of the image", ...})
        # half of the time: image and label mirrored, text "polyp located in left of the image", tokens updated
    """

    def __init__(
        self,
        keys: KeysCollection,
        text_key: str = "text",
        tokenize: TokenizeTextd | None = None,
        prob: float = 0.5,
        spatial_axis: int = 0,
        word_pairs: Sequence[Sequence[str]] = HORIZONTAL_WORDS,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if tokenize is not None and not isinstance(tokenize, TokenizeTextd):
            raise TypeError(f"tokenize must be a TokenizeTextd or None, got {type(tokenize).__name__}")
        if any(len(pair) != 2 for pair in word_pairs):
            raise ValueError(f"word_pairs must be pairs of words, got {word_pairs!r}")
        self.text_key = text_key
        self.tokenize = tokenize
        self.flip = Flip(spatial_axis=int(spatial_axis))
        self.word_pairs = tuple(tuple(str(word).lower() for word in pair) for pair in word_pairs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.flip(d[key])
        if self.text_key in d:
            d[self.text_key] = swap_direction_words(d[self.text_key], self.word_pairs)
            if self.tokenize is not None:
                source = source_name(d["image"], d, "image") if "image" in d else None
                tokens = self.tokenize.tokenize(d[self.text_key], source=source)
                d[self.tokenize.input_ids_key], d[self.tokenize.attention_mask_key] = tokens
        return d
