"""MONAI datalists for text-guided segmentation: the schema, atomic writing, loading and checked loading.

A HiMix datalist is a MONAI (Decathlon-style) datalist JSON file::

    {
        "training":   [{"image": "/abs/a.png", "label": "/abs/mask_a.png", "text": "Bilateral infection ..."}, ...],
        "validation": [...],
        "test":       [...]
    }

readable by :py:func:`monai.data.load_decathlon_datalist`. :py:func:`write_datalist` validates and writes one
atomically, :py:func:`load_datalist` loads a split with errors that name the file, and
:py:func:`load_checked_datalist` (training, evaluation) and :py:func:`drop_unusable_images` (inference) check
the files of a split before the run starts (:py:mod:`~himix_monai.data.image_checks`). The converters'
helpers live in their own modules (:py:mod:`~himix_monai.data.skip_report`,
:py:mod:`~himix_monai.data.file_matching`, :py:mod:`~himix_monai.data.sheets`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from himix_monai.config_utils import as_bool
from himix_monai.data.image_checks import PairProblem, check_image_label_pair, check_in_threads, read_spatial_size
from himix_monai.errors import DatalistError, NonFiniteImageError, UnreadableImageError
from himix_monai.files import write_text_atomically

__all__ = [
    "DATALIST_SPLITS",
    "REQUIRED_ITEM_KEYS",
    "DatalistError",
    "validate_datalist",
    "write_datalist",
    "read_datalist_split",
    "load_datalist",
    "drop_unusable_images",
    "load_checked_datalist",
]

_LOGGER = logging.getLogger(__name__)

DATALIST_SPLITS: tuple[str, ...] = ("training", "validation", "test")
"""The split keys of a HiMix datalist, in the order they are written."""

REQUIRED_ITEM_KEYS: tuple[str, ...] = ("image", "label", "text")
"""The keys every datalist item must have."""

_MAX_LISTED_ITEMS = 10  # bad datalist items shown in an error message


def _validate_item(item: Any, split: str, position: int, source: str) -> None:
    where = f"{source}: item {position} of {split!r}"
    if not isinstance(item, Mapping):
        raise DatalistError(f"{where} is a {type(item).__name__}, expected an object with {list(REQUIRED_ITEM_KEYS)}")
    missing = [key for key in REQUIRED_ITEM_KEYS if key not in item]
    if missing:
        raise DatalistError(f"{where} lacks {', '.join(map(repr, missing))} (has: {', '.join(map(repr, item))})")
    for key in ("image", "label"):
        value = item[key]
        is_path_list = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
        if not (isinstance(value, str) and value) and not is_path_list:
            raise DatalistError(f"{where}: {key!r} must be a non-empty path, got {value!r}")
    if not isinstance(item["text"], str) or not item["text"].strip():
        raise DatalistError(f"{where}: 'text' must be a non-empty string, got {item['text']!r}")


def _validate_split(datalist: Mapping[str, Any], split: str, source: str) -> None:
    items = datalist[split]
    if not isinstance(items, list):
        raise DatalistError(f"{source}: {split!r} is a {type(items).__name__}, expected a list of items")
    for position, item in enumerate(items, start=1):
        _validate_item(item, split, position, source)


def validate_datalist(datalist: Any, source: str = "datalist") -> None:
    """Check that ``datalist`` is a HiMix datalist.

    It must be an object with at least one of :py:data:`DATALIST_SPLITS`, each a list of items with
    non-empty ``image`` and ``label`` paths and a non-empty ``text``. Other top-level keys (metadata) are allowed.

    Args:
        datalist: the parsed datalist.
        source: how to name the datalist in error messages, usually its file.

    Raises:
        DatalistError: naming ``source``, the split and the item position.
    """
    if not isinstance(datalist, Mapping):
        raise DatalistError(f"{source}: a datalist must be a JSON object, got {type(datalist).__name__}")
    splits = [split for split in DATALIST_SPLITS if split in datalist]
    if not splits:
        found = ", ".join(map(repr, datalist)) or "none"
        raise DatalistError(f"{source}: lacks all of the keys {list(DATALIST_SPLITS)} (found: {found})")
    for split in splits:
        _validate_split(datalist, split, source)


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate ``datalist`` and write it to ``path`` atomically.

    The JSON is written to a temporary file in the same folder, flushed and fsynced, then moved over
    ``path`` with :py:func:`os.replace`: readers see either the old file or the complete new one, never a
    half-written datalist. Missing parent folders are created.

    Args:
        datalist: the datalist, see :py:func:`validate_datalist`.
        path: the output file.

    Returns:
        The absolute path written.

    Raises:
        DatalistError: when ``datalist`` is invalid (nothing is written).
    """
    path = Path(path).absolute()
    validate_datalist(datalist, source=f"datalist for {path}")
    text = json.dumps(datalist, indent=2, ensure_ascii=False) + "\n"
    write_text_atomically(path, text)
    return path


def read_datalist_split(path: Path, split: str, error: type[DatalistError] = DatalistError) -> dict[str, Any]:
    """Parse the datalist JSON file ``path`` and check that it is an object holding ``split``; the one reader of
    datalist files, so every caller names the file the same way.

    Args:
        path: the datalist JSON file.
        split: the split that must be present.
        error: the :py:class:`DatalistError` subclass raised.

    Raises:
        DatalistError: (``error``) naming the file when it is missing, not valid JSON, not an object or lacks
            ``split``.
    """
    if not path.is_file():
        raise error(f"{path}: datalist file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except UnicodeDecodeError as err:
        raise error(f"{path}: not valid JSON: not UTF-8 text ({err})") from err
    if not isinstance(raw, Mapping):
        raise error(f"{path}: a datalist must be a JSON object, got {type(raw).__name__}")
    if split not in raw:
        raise error(f"{path}: lacks the split {split!r} (found: {', '.join(map(repr, raw)) or 'none'})")
    return dict(raw)


def load_datalist(
    path: str | os.PathLike,
    split: str = "training",
    base_dir: str | os.PathLike | None = None,
    skip_empty_text: bool = False,
) -> list[dict]:
    """Load one split of a datalist with :py:func:`monai.data.load_decathlon_datalist`.

    The file and the split's items are validated first so that errors name the file; relative ``image``
    and ``label`` paths are resolved against ``base_dir`` (default: the datalist's folder). The ``text``
    of each item is kept as written (MONAI would turn a text that happens to name an existing path into
    that path). An empty split gives an empty list.

    Args:
        path: the datalist JSON file.
        split: the split to load, e.g. ``"training"``, ``"validation"`` or ``"test"``.
        base_dir: the folder relative paths are resolved against.
        skip_empty_text: leave items whose ``text`` is empty or blank out, with a warning naming each, instead of
            raising (``skip_bad_items`` of the bundle).

    Returns:
        The split's items as dicts with ``image``, ``label`` and ``text``.

    Raises:
        DatalistError: when the file is missing, is not valid JSON, lacks ``split`` or has invalid items.
    """
    from monai.data import load_decathlon_datalist

    path = Path(path)
    raw = read_datalist_split(path, split)
    entries = raw[split]
    if skip_empty_text and isinstance(entries, list):
        keep = [not (isinstance(e, Mapping) and isinstance(e.get("text", ""), str) and not e.get("text", "").strip())
                for e in entries]
        for position in (number for number, kept in enumerate(keep, start=1) if not kept):
            image = entries[position - 1].get("image")
            _LOGGER.warning("%s: skipped item %d of %r: empty text (image %s)", path, position, split, image)
        raw = {**raw, split: [entry for entry, kept in zip(entries, keep) if kept]}
    _validate_split(raw, split, str(path))
    if not raw[split]:
        return []
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=base_dir)
    if len(items) != len(raw[split]):
        items = [item for item, kept in zip(items, keep) if kept]
    for item, raw_item in zip(items, raw[split]):
        item["text"] = raw_item["text"]  # MONAI turns a text that names an existing file into a path
    return items


def drop_unusable_images(
    items: Sequence[Mapping[str, Any]], skip_bad_items: bool | str = False, key: str = "image"
) -> list[Mapping[str, Any]]:
    """With ``skip_bad_items``, leave out the items whose image cannot be read or holds NaN or infinite values.

    For inference, which has no label to check: each item's ``key`` file is decoded with
    :py:func:`read_spatial_size` and a bad one is logged (file and reason) and left out. Without
    ``skip_bad_items`` the items are returned unchanged and unread; the preprocessing then stops at a bad image,
    naming it (``EnsureFinited``).

    Args:
        items: items with a file path under ``key``.
        skip_bad_items: check and leave bad items out; booleans given as text are read as such.
        key: the key of the image path.

    Returns:
        The usable items, in order.
    """
    if not as_bool(skip_bad_items, "skip_bad_items"):
        return list(items)
    kept = []
    for item in items:
        path = item.get(key)
        if isinstance(path, (str, os.PathLike)):
            try:
                read_spatial_size(path, verify=True)
            except (UnreadableImageError, NonFiniteImageError) as err:
                _LOGGER.warning("skipped %s (skip_bad_items): %s", path, err)
                continue
        kept.append(item)
    if len(kept) < len(items):
        _LOGGER.warning("%d of %d images are skipped; %d are used.", len(items) - len(kept), len(items), len(kept))
    return kept


def _item_problem(item: Mapping[str, Any], verify: bool) -> PairProblem | None:
    image, label = item.get("image"), item.get("label")
    if not isinstance(image, (str, os.PathLike)) or not isinstance(label, (str, os.PathLike)):
        files = [f for key in ("image", "label") for f in (item[key] if isinstance(item[key], list) else [item[key]])]
        absent = [str(f) for f in files if not Path(f).exists()]
        return PairProblem("missing file", ", ".join(absent) + " not found") if absent else None
    return check_image_label_pair(image, label, verify=verify, two_d=True)


def _common_keys(items: list[dict], source: str) -> list[dict]:
    """Keep the keys every item has: batching items with different keys fails with a bare ``KeyError``."""
    if not items:
        return items
    common = set(items[0]).intersection(*items[1:])
    extra = Counter(key for item in items for key in item if key not in common)
    if not extra:
        return items
    detail = ", ".join(f"{key!r} (in {count} of {len(items)} items)" for key, count in sorted(extra.items()))
    _LOGGER.info("%s: keys that only some items have are not used: %s", source, detail)
    return [{k: v for k, v in item.items() if k in common} for item in items]


def load_checked_datalist(
    path: str | os.PathLike,
    split: str = "training",
    check_files: bool = True,
    skip_bad_items: bool = False,
    verify: bool = True,
    num_workers: int | None = None,
    base_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Load a datalist split and check its files before training starts.

    The datalist is read with :py:func:`himix_monai.data.datalist.load_datalist` (errors name the file, the split
    and the item: invalid JSON, missing keys, empty text). Then every item's image and mask are checked:
    present, readable (decoded when ``verify``, so truncated or corrupt PNG/JPEG/DICOM files, DICOM files
    without pixel data and float images with NaN or infinite values are found), of the same spatial size, and
    2-D. Bad items either stop the run with one :py:class:`~himix_monai.data.datalist.DatalistError` that
    counts them by reason and lists the first few (file, item number, file names), or, with
    ``skip_bad_items``, are logged, counted and left out (items with an empty text too).

    Keys that only some items have (e.g. ``image_dicom`` in the demo items but not in items added by hand)
    are dropped, with one log line: batching items with different keys would fail with a bare ``KeyError``.

    Args:
        path: the datalist JSON file.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        check_files: check the files; False only loads the datalist. Booleans given as text (``"false"``) are
            read as such, see :py:func:`~himix_monai.config_utils.as_bool`.
        skip_bad_items: leave bad items (also items with an empty text) out, with a warning each and a summary,
            instead of stopping.
        verify: decode the files to find truncated or corrupt ones and NaN or infinite values; False reads the
            headers only.
        num_workers: threads for the checks; default ``min(8, cpu count)``.
        base_dir: the folder relative paths are resolved against (default: the datalist's folder).

    Returns:
        The split's usable items.

    Raises:
        DatalistError: for an invalid datalist, for bad items unless ``skip_bad_items``, and when no item of a
            non-empty split is usable.
    """
    skip_bad_items = as_bool(skip_bad_items, "skip_bad_items")
    items = load_datalist(path, split=split, base_dir=base_dir, skip_empty_text=skip_bad_items)
    items = _common_keys(items, f"{path} ({split!r})")
    if not as_bool(check_files, "check_files") or not items:
        return items
    problems = list(check_in_threads(lambda item: _item_problem(item, verify), items, num_workers))
    bad = [(number, problem) for number, problem in enumerate(problems, start=1) if problem is not None]
    if not bad:
        return items
    counts = Counter(problem.reason for _, problem in bad)
    summary = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
    where = f"{path}: {len(bad)} of {len(items)} {split!r} items"
    if not skip_bad_items:
        listed = [f"  item {number}: {problem.reason}: {problem.detail}" for number, problem in bad[:_MAX_LISTED_ITEMS]]
        if len(bad) > _MAX_LISTED_ITEMS:
            listed.append(f"  ... ({len(bad) - _MAX_LISTED_ITEMS} more)")
        raise DatalistError(
            f"{where} cannot be used ({summary}):\n"
            + "\n".join(listed)
            + "\nFix or remove them (the data_prep converters skip such items), or set skip_bad_items to true "
            "(--skip_bad_items true) to leave them out."
        )
    for number, problem in bad:
        _LOGGER.warning("%s: skipped item %d of %r: %s: %s", path, number, split, problem.reason, problem.detail)
    if len(bad) == len(items):
        raise DatalistError(f"{where} cannot be used ({summary}): no usable item left.")
    _LOGGER.warning("%s are skipped (%s); %d are used.", where, summary, len(items) - len(bad))
    return [item for item, problem in zip(items, problems) if problem is None]
