"""
Skip reports of the dataset converters: which items were left out, from which file and row, and why.

:py:class:`SkipReport` collects the skipped items (item id, file, row, reason), logs them, and in ``strict`` mode
raises :py:class:`~himix_monai.errors.DatalistError` at the first one.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

from himix_monai.errors import DatalistError

__all__ = ["SkipReason", "SkippedItem", "SkipReport"]

_LOGGER = logging.getLogger("himix_monai.data.datalist")


class SkipReason:
    """The reasons for skipping an item, as shown in warnings and in the summary counts."""

    MISSING_IMAGE = "missing image"
    MISSING_MASK = "missing mask"
    UNREADABLE_IMAGE = "unreadable image"
    UNREADABLE_MASK = "unreadable mask"
    SIZE_MISMATCH = "image/mask size mismatch"
    NON_FINITE_IMAGE = "NaN or infinite values in image"
    NON_FINITE_MASK = "NaN or infinite values in mask"
    DUPLICATE_ID = "duplicate id"
    EMPTY_DESCRIPTION = "empty description"
    MISSING_PROMPT = "missing prompt"
    MALFORMED_ENTRY = "malformed entry"


@dataclass(frozen=True)
class SkippedItem:
    """One skipped item and where it came from.

    Args:
        item_id: the item's id, usually the image name as written in the annotation file.
        file: the annotation file (sheet, csv or json) that lists the item.
        row: the item's row as a human sees it (header is row 1) or its 1-based entry number; None if unknown.
        reason: one of the :py:class:`SkipReason` values.
        detail: a free-text explanation, e.g. the path that was looked for.
        unit: what ``row`` counts: ``"row"`` for sheets and csv files, ``"entry"`` for json lists.
    """

    item_id: str
    file: str
    row: int | None
    reason: str
    detail: str = ""
    unit: str = "row"

    @property
    def location(self) -> str:
        """Where the item is listed, e.g. ``row 5 of /data/Train_text.xlsx``."""
        if self.row is None:
            return str(self.file)
        return f"{self.unit} {self.row} of {self.file}"

    def message(self) -> str:
        """A one-line description: location, item id, reason and detail."""
        text = f"{self.location} ({self.item_id!r}): {self.reason}"
        return f"{text}: {self.detail}" if self.detail else text


class SkipReport:
    """Collects the items a converter skipped and the notes it wants to show once in the summary.

    In ``strict`` mode the first skipped item raises :py:class:`DatalistError` with its file, row and reason.

    Args:
        strict: raise on the first skipped item instead of collecting it.
        logger: where each skipped item is logged as a warning; defaults to this module's logger.
    """

    def __init__(self, strict: bool = False, logger: logging.Logger | None = None) -> None:
        self.strict = strict
        self.logger = logger if logger is not None else _LOGGER
        self.items: list[SkippedItem] = []
        """The skipped items, in the order they were reported."""
        self._notes: dict[str, tuple[str, list[str]]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def skip(
        self,
        item_id: str,
        reason: str,
        file: str | os.PathLike,
        row: int | None = None,
        detail: str = "",
        unit: str = "row",
    ) -> None:
        """Record a skipped item and log a warning; raise :py:class:`DatalistError` in strict mode.

        Args:
            item_id, reason, file, row, detail, unit: as :py:class:`SkippedItem`.

        Raises:
            DatalistError: in strict mode.
        """
        item = SkippedItem(str(item_id), str(file), row, reason, detail, unit)
        self.items.append(item)
        if self.strict:
            raise DatalistError(f"{item.message()} (--strict: stopping at the first bad item)")
        self.logger.warning("skipped %s", item.message())

    def add_note(self, key: str, summary: str, example: str = "") -> None:
        """Count an event that is reported once in the summary rather than once per item.

        Args:
            key: identifies the kind of event; notes with the same key are counted together.
            summary: the summary text, where ``{count}`` is replaced by the number of events,
                e.g. ``"resolved {count} extension mismatches"``.
            example: an example of the event; the first one is shown.
        """
        self._notes.setdefault(key, (summary, []))[1].append(example)

    def notes(self) -> list[str]:
        """The summary notes, one line each: ``resolved 14 extension mismatches, e.g. sheet 'a.png' -> 'a.tif'``."""
        return [
            summary.replace("{count}", str(len(examples))) + (f", e.g. {examples[0]}" if examples[0] else "")
            for summary, examples in self._notes.values()
        ]

    def counts_by_reason(self) -> dict[str, int]:
        """Number of skipped items per reason, most frequent first (ties in order of first occurrence)."""
        return dict(Counter(item.reason for item in self.items).most_common())

    def summary(self) -> str:
        """E.g. ``skipped 3 (missing mask: 2, empty description: 1)`` or ``skipped 0``."""
        if not self.items:
            return "skipped 0"
        counts = ", ".join(f"{reason}: {count}" for reason, count in self.counts_by_reason().items())
        return f"skipped {len(self.items)} ({counts})"
