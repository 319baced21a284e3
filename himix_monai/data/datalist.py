"""MONAI datalists for text-guided segmentation: validation, atomic writing, loading and input checks.

A HiMix datalist is a MONAI (Decathlon-style) datalist JSON file::

    {
        "training":   [{"image": "/abs/a.png", "label": "/abs/mask_a.png", "text": "Bilateral infection ..."}, ...],
        "validation": [...],
        "test":       [...]
    }

readable by :py:func:`monai.data.load_decathlon_datalist`. This module holds the code shared by the
dataset converters in ``data_prep``:

- :py:func:`write_datalist` validates a datalist and writes it atomically, so a crash or a failed
  conversion never leaves a half-written file behind;
- :py:func:`load_datalist` loads one split with clear errors that name the file;
- :py:class:`SkipReport` collects the items a converter skipped (item id, file, row, reason) and
  raises :py:class:`DatalistError` on the first one in ``strict`` mode;
- :py:func:`read_spatial_size` and :py:func:`check_image_label_pair` check that an image/mask pair
  exists, is readable (truncated files included) and has the same spatial size;
- :py:class:`DirectoryIndex`, :py:func:`find_image_file` and :py:func:`find_mask_file` resolve the
  file names written in annotation sheets to files on disk (extension mismatches, ``mask_`` prefixes);
- :py:func:`read_description_sheet` reads ``Image``/``Description`` tables from ``.xlsx``/``.csv``;
- :py:func:`build_datalist` turns checked candidate items into a datalist; :py:func:`check_datalist_files`
  runs the same check on the items of an existing datalist (``data_prep.reports``);
- :py:func:`load_checked_datalist` loads a split for training and checks its files up front (missing,
  unreadable, size mismatch, 3-D volume), raising one :py:class:`DatalistError` that lists the bad items, or
  skipping and counting them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from himix_monai.files import (
    IMAGE_EXTENSIONS,
    JPEG_EXTENSIONS,
    NIFTI_EXTENSIONS,
    TIFF_EXTENSIONS,
    split_image_extension,
    write_text_atomically,
)
from himix_monai.config_utils import as_bool
from himix_monai.errors import HiMixError, NonFiniteImageError, UnreadableImageError

__all__ = [
    "DATALIST_SPLITS",
    "REQUIRED_ITEM_KEYS",
    "IMAGE_EXTENSIONS",
    "MASK_PREFIX",
    "ProgressFn",
    "DatalistError",
    "UnreadableImageError",
    "SkipReason",
    "SkippedItem",
    "SkipReport",
    "SheetRow",
    "FileMatch",
    "PairProblem",
    "CandidateItem",
    "DirectoryIndex",
    "split_image_extension",
    "find_image_file",
    "mask_name_candidates",
    "find_mask_file",
    "read_description_sheet",
    "validate_datalist",
    "write_datalist",
    "load_datalist",
    "read_spatial_size",
    "check_image_label_pair",
    "build_datalist",
    "check_datalist_files",
    "drop_unusable_images",
    "load_checked_datalist",
]

_LOGGER = logging.getLogger(__name__)

DATALIST_SPLITS: tuple[str, ...] = ("training", "validation", "test")
"""The split keys of a HiMix datalist, in the order they are written."""

REQUIRED_ITEM_KEYS: tuple[str, ...] = ("image", "label", "text")
"""The keys every datalist item must have."""

MASK_PREFIX = "mask_"
"""Prefix of QaTa-COV19 mask file names (``mask_<image name>``)."""

_PNG_END = b"IEND\xaeB`\x82"  # type and CRC of the IEND chunk that ends every complete PNG file
_MAX_LISTED_ITEMS = 10  # bad datalist items shown in an error message

ProgressFn = Callable[[Iterable[Any], int, str], Iterable[Any]]
"""``progress(iterable, total, description)`` wraps an iterable to show progress (e.g. with tqdm)."""


class DatalistError(HiMixError, ValueError):
    """A datalist, an annotation file or one of its rows is invalid; the message names the file (and row)."""


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
        self._items: list[SkippedItem] = []
        self._notes: dict[str, tuple[str, list[str]]] = {}

    @property
    def items(self) -> list[SkippedItem]:
        """The skipped items, in the order they were reported."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

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
            item_id: the item's id, usually the image name as written in the annotation file.
            reason: one of the :py:class:`SkipReason` values.
            file: the annotation file that lists the item.
            row: the item's human row number (header is row 1) or 1-based entry number.
            detail: a free-text explanation.
            unit: ``"row"`` or ``"entry"``, what ``row`` counts.

        Raises:
            DatalistError: in strict mode.
        """
        item = SkippedItem(str(item_id), str(file), row, reason, detail, unit)
        self._items.append(item)
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
        if key not in self._notes:
            self._notes[key] = (summary, [])
        self._notes[key][1].append(example)

    def notes(self) -> list[str]:
        """The summary notes, one line each.

        For example ``resolved 14 extension mismatches, e.g. sheet 'a.png' -> 'a.tif'``.
        """
        lines = []
        for summary, examples in self._notes.values():
            line = summary.replace("{count}", str(len(examples)))
            if examples[0]:
                line += f", e.g. {examples[0]}"
            lines.append(line)
        return lines

    def counts_by_reason(self) -> dict[str, int]:
        """Number of skipped items per reason, most frequent first (ties in order of first occurrence)."""
        counts = Counter(item.reason for item in self._items)
        first_seen = {reason: index for index, reason in reversed(list(enumerate(i.reason for i in self._items)))}
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], first_seen[kv[0]])))

    def summary(self) -> str:
        """E.g. ``skipped 3 (missing mask: 2, empty description: 1)`` or ``skipped 0``."""
        if not self._items:
            return "skipped 0"
        counts = ", ".join(f"{reason}: {count}" for reason, count in self.counts_by_reason().items())
        return f"skipped {len(self._items)} ({counts})"


class SheetRow(NamedTuple):
    """One data row of an ``Image``/``Description`` table.

    Args:
        row: the row number as a human sees it in the file (header is row 1, first data row is row 2).
        image: the ``Image`` cell, stripped; ``""`` when empty.
        description: the ``Description`` cell, stripped; ``""`` when empty or NaN.
    """

    row: int
    image: str
    description: str


class FileMatch(NamedTuple):
    """A file found for a name written in an annotation file.

    Args:
        path: the file found.
        requested: the name as written in the annotation file.
        by_stem: True when the file was found by its stem because the extension differed.
    """

    path: Path
    requested: str
    by_stem: bool


class PairProblem(NamedTuple):
    """Why an image/mask pair cannot be used.

    Args:
        reason: one of the :py:class:`SkipReason` values.
        detail: a free-text explanation naming the file.
    """

    reason: str
    detail: str


@dataclass(frozen=True)
class CandidateItem:
    """An item a converter wants to put into the datalist, before its files are checked.

    Args:
        split: the datalist split, one of :py:data:`DATALIST_SPLITS`.
        item_id: the item's id, usually the image name as written in the annotation file.
        image: the image file.
        label: the mask file.
        text: the text prompt.
        source_file: the annotation file that lists the item.
        row: the item's human row number or 1-based entry number in ``source_file``.
        unit: ``"row"`` or ``"entry"``, what ``row`` counts.
    """

    split: str
    item_id: str
    image: Path
    label: Path
    text: str
    source_file: Path
    row: int | None
    unit: str = "row"

    def to_datalist_item(self) -> dict[str, str]:
        """The datalist item, with absolute resolved paths."""
        return {"image": str(Path(self.image).resolve()), "label": str(Path(self.label).resolve()), "text": self.text}


def _is_image_name(name: str) -> bool:
    return split_image_extension(name)[1].lower() in IMAGE_EXTENSIONS


class DirectoryIndex:
    """The files of one folder, listed once, for fast name lookups with extension-mismatch resolution.

    Args:
        folder: the folder to list; a missing folder gives an empty index.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.exists = self.folder.is_dir()
        names = sorted(entry.name for entry in os.scandir(self.folder) if entry.is_file()) if self.exists else []
        self.names: frozenset[str] = frozenset(names)
        self._names_by_stem: dict[str, list[str]] = {}
        for name in names:
            stem, extension = split_image_extension(name)
            if extension.lower() in IMAGE_EXTENSIONS:
                self._names_by_stem.setdefault(stem, []).append(name)
        for candidates in self._names_by_stem.values():
            candidates.sort(key=lambda n: IMAGE_EXTENSIONS.index(split_image_extension(n)[1].lower()))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def image_names(self) -> list[str]:
        """The names of the image files in the folder, sorted."""
        return sorted(name for name in self.names if _is_image_name(name))

    def find(self, name: str) -> FileMatch | None:
        """Find the file for ``name``: the exact name, else an image file with the same stem.

        Args:
            name: a file name as written in an annotation file.

        Returns:
            The match, or None if neither the name nor its stem is in the folder.
        """
        if name in self.names:
            return FileMatch(self.folder / name, name, by_stem=False)
        candidates = self._names_by_stem.get(split_image_extension(name)[0], [])
        if candidates:
            return FileMatch(self.folder / candidates[0], name, by_stem=True)
        return None


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name for name in names if name))


def find_image_file(index: DirectoryIndex, name: str) -> FileMatch | None:
    """Find the image listed as ``name``: as written, else without a leading ``mask_`` prefix.

    GuideDecoder's QaTa-COV19 csv files list images by their mask name (``mask_covid_1.png``) while the
    image file is ``covid_1.png``.

    Args:
        index: the image folder.
        name: the image name as written in the annotation file.

    Returns:
        The match (its ``requested`` is ``name``), or None.
    """
    candidates = [name]
    if name.startswith(MASK_PREFIX):
        candidates.append(name[len(MASK_PREFIX) :])
    return _first_match(index, name, candidates)


def _first_match(index: DirectoryIndex, name: str, candidates: list[str]) -> FileMatch | None:
    """The first candidate file name found in ``index``: exact names first, then by stem."""
    for candidate in candidates:
        if candidate in index:
            return FileMatch(index.folder / candidate, name, by_stem=False)
    for candidate in candidates:
        match = index.find(candidate)
        if match is not None:
            return FileMatch(match.path, name, match.by_stem)
    return None


def mask_name_candidates(name: str, image_name: str) -> list[str]:
    """The mask file names to try for an item, in order: as written, the image name, ``mask_`` + image name.

    Args:
        name: the item's name as written in the annotation file.
        image_name: the name of the image file found for the item.
    """
    return _unique([name, image_name, MASK_PREFIX + image_name, MASK_PREFIX + name])


def find_mask_file(index: DirectoryIndex, name: str, image_name: str) -> FileMatch | None:
    """Find the mask for an item, trying :py:func:`mask_name_candidates` exactly, then by stem.

    Args:
        index: the mask folder.
        name: the item's name as written in the annotation file.
        image_name: the name of the image file found for the item.

    Returns:
        The match (its ``requested`` is ``name``), or None.
    """
    candidates = mask_name_candidates(name, image_name)
    return _first_match(index, name, candidates)


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value).strip()


def _find_column(columns: Sequence[Any], wanted: str) -> Any | None:
    for column in columns:
        if str(column).strip().lower() == wanted.lower():
            return column
    return None


def read_description_sheet(
    path: str | os.PathLike, image_column: str = "Image", text_column: str = "Description"
) -> list[SheetRow]:
    """Read an ``Image``/``Description`` table from an ``.xlsx``/``.xls`` or ``.csv`` file.

    Column names are matched ignoring case and surrounding spaces. Cells are read as text; empty and NaN
    cells become ``""``.

    Args:
        path: the sheet.
        image_column: the column holding image names.
        text_column: the column holding the descriptions.

    Returns:
        The data rows with their human row numbers (header is row 1).

    Raises:
        DatalistError: when the file cannot be read or lacks one of the columns.
    """
    import pandas as pd

    path = Path(path)
    try:
        if path.suffix.lower() in (".xlsx", ".xls", ".xlsm"):
            table = pd.read_excel(path, dtype=str)
        else:
            table = pd.read_csv(path, dtype=str, skip_blank_lines=False, encoding="utf-8-sig")
    except Exception as err:  # pandas/openpyxl raise many types for corrupt files
        raise DatalistError(f"{path}: cannot read the sheet: {type(err).__name__}: {err}") from err
    columns = list(table.columns)
    image_key, text_key = _find_column(columns, image_column), _find_column(columns, text_column)
    missing = [name for name, key in ((image_column, image_key), (text_column, text_key)) if key is None]
    if missing:
        found = ", ".join(repr(str(c)) for c in columns) or "none"
        raise DatalistError(f"{path}: lacks the column(s) {', '.join(map(repr, missing))} (found: {found})")
    rows = []
    for offset, (image, text) in enumerate(zip(table[image_key].tolist(), table[text_key].tolist())):
        image, text = _cell_text(image), _cell_text(text)
        if not image and not text:
            continue  # blank line
        rows.append(SheetRow(row=offset + 2, image=image, description=text))
    return rows


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
    if not path.is_file():
        raise DatalistError(f"{path}: datalist file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatalistError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except UnicodeDecodeError as err:
        raise DatalistError(f"{path}: not valid JSON: not UTF-8 text ({err})") from err
    if not isinstance(raw, Mapping):
        raise DatalistError(f"{path}: a datalist must be a JSON object, got {type(raw).__name__}")
    if split not in raw:
        found = ", ".join(map(repr, raw)) or "none"
        raise DatalistError(f"{path}: lacks the key {split!r} (found: {found})")
    keep = [True] * len(raw[split]) if isinstance(raw[split], list) else []
    if skip_empty_text and isinstance(raw[split], list):
        for position, item in enumerate(raw[split], start=1):
            if isinstance(item, Mapping) and isinstance(item.get("text", ""), str) and not item.get("text", "").strip():
                keep[position - 1] = False
                _LOGGER.warning(
                    "%s: skipped item %d of %r: empty text (image %s)", path, position, split, item.get("image")
                )
        raw = {**raw, split: [item for item, kept in zip(raw[split], keep) if kept]}
    _validate_split(raw, split, str(path))
    if not raw[split]:
        return []
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split, base_dir=base_dir)
    items = [item for item, kept in zip(items, keep) if kept]
    for item, raw_item in zip(items, raw[split]):
        item["text"] = raw_item["text"]
    return items


def _pil_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        if verify:
            if path.suffix.lower() in JPEG_EXTENSIONS:
                # decode at reduced scale: still reads the whole entropy-coded stream, so truncation is detected
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
            if image.format == "PNG":
                _check_png_end(path)
            if image.mode.startswith("F"):  # 32-bit float TIFF: the only PIL mode that holds NaN or inf
                import numpy as np

                _check_finite(path, np.asarray(image))
    return (height, width)


def _check_png_end(path: Path) -> None:
    """A PNG cut inside its last chunk still decodes; a complete file ends with the IEND chunk."""
    with open(path, "rb") as stream:
        stream.seek(max(0, path.stat().st_size - len(_PNG_END)))
        if stream.read() != _PNG_END:
            raise UnreadableImageError(f"{path}: truncated PNG (no IEND chunk at the end of the file)")


def _check_finite(path: Path, pixels: Any) -> None:
    """Raise :py:class:`~himix_monai.errors.NonFiniteImageError` when float pixel data holds NaN or inf."""
    import numpy as np

    pixels = np.asarray(pixels)
    if pixels.dtype.kind not in "fc":
        return
    nans, infs = int(np.isnan(pixels).sum()), int(np.isinf(pixels).sum())
    if nans or infs:
        raise NonFiniteImageError(f"{path}: {nans} NaN and {infs} infinite pixel values (of {pixels.size})")


def _tifffile_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        shape = tuple(page.shape)
        if verify:
            _check_finite(path, page.asarray())
    # (H, W) or (H, W, samples)
    return shape[:2]


def _nifti_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    import nibabel
    import numpy as np

    image = nibabel.load(str(path))
    shape = tuple(int(s) for s in image.shape)
    if verify:
        _check_finite(path, np.asanyarray(image.dataobj))
    return shape[:3]


def _dicom_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    import pydicom

    dataset = pydicom.dcmread(str(path), stop_before_pixels=not verify)
    if "Rows" not in dataset or "Columns" not in dataset:
        raise UnreadableImageError(f"{path}: DICOM file has no Rows/Columns (not an image?)")
    if verify:
        _check_finite(path, dataset.pixel_array)  # decodes the pixel data, raises on truncated or corrupt data
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    size = (int(dataset.Rows), int(dataset.Columns))
    return size if frames == 1 else (frames, *size)


def _drop_trailing_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_spatial_size(path: str | os.PathLike, verify: bool = True) -> tuple[int, ...]:
    """Read the spatial size of an image file, checking that it is readable.

    2D formats (png, jpg, tif, bmp) give ``(H, W)`` whatever the number of channels, so a 3-channel mask
    has the same size as its 1-channel image. NIfTI gives its (up to 3) spatial dimensions, DICOM
    ``(rows, columns)`` or ``(frames, rows, columns)``; trailing singleton dimensions are dropped.

    Args:
        path: the image file.
        verify: decode the pixel data to detect truncated or corrupt files and NaN or infinite values; False
            reads the header only.

    Returns:
        The spatial size.

    Raises:
        UnreadableImageError: when the file cannot be read or decoded.
        NonFiniteImageError: with ``verify``, when float pixel data (float TIFF, NIfTI, DICOM) holds NaN or inf.
    """
    path = Path(path)
    extension = split_image_extension(path.name)[1].lower()
    try:
        if extension in NIFTI_EXTENSIONS:
            shape = _nifti_spatial_size(path, verify)
        elif extension == ".dcm":
            shape = _dicom_spatial_size(path, verify)
        else:
            try:
                shape = _pil_spatial_size(path, verify)
            except Exception:
                if extension not in TIFF_EXTENSIONS:
                    raise
                shape = _tifffile_spatial_size(path, verify)  # TIFF flavours PIL cannot decode
    except (UnreadableImageError, NonFiniteImageError):
        raise
    except Exception as err:  # each reader raises its own types for corrupt input
        raise UnreadableImageError(f"{path}: {type(err).__name__}: {err}") from err
    return _drop_trailing_singletons(shape)


def _format_size(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def check_image_label_pair(
    image: str | os.PathLike, label: str | os.PathLike, verify: bool = True
) -> PairProblem | None:
    """Check that an image and its mask exist, are readable and have the same spatial size.

    Args:
        image: the image file.
        label: the mask file.
        verify: decode the files to detect truncated or corrupt ones and NaN or infinite values; False reads
            headers only.

    Returns:
        None if the pair is usable, else the problem.
    """
    image, label = Path(image), Path(label)
    if not image.is_file():
        return PairProblem(SkipReason.MISSING_IMAGE, f"{image} not found")
    if not label.is_file():
        return PairProblem(SkipReason.MISSING_MASK, f"{label} not found")
    try:
        image_size = read_spatial_size(image, verify)
    except UnreadableImageError as err:
        return PairProblem(SkipReason.UNREADABLE_IMAGE, str(err))
    except NonFiniteImageError as err:
        return PairProblem(SkipReason.NON_FINITE_IMAGE, str(err))
    try:
        label_size = read_spatial_size(label, verify)
    except UnreadableImageError as err:
        return PairProblem(SkipReason.UNREADABLE_MASK, str(err))
    except NonFiniteImageError as err:
        return PairProblem(SkipReason.NON_FINITE_MASK, str(err))
    if image_size != label_size:
        detail = f"image {image} is {_format_size(image_size)}, mask {label} is {_format_size(label_size)}"
        return PairProblem(SkipReason.SIZE_MISMATCH, detail)
    return None


def _no_progress(iterable: Iterable[Any], total: int, description: str) -> Iterable[Any]:
    return iterable


def _checked_pairs(
    candidates: Sequence[CandidateItem], verify: bool, num_workers: int
) -> Iterator[PairProblem | None]:
    if num_workers <= 1:
        yield from (check_image_label_pair(c.image, c.label, verify) for c in candidates)
        return
    executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="datalist-check")
    try:
        yield from executor.map(lambda c: check_image_label_pair(c.image, c.label, verify), candidates)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def build_datalist(
    candidates: Sequence[CandidateItem],
    report: SkipReport,
    verify: bool = True,
    num_workers: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, list[dict[str, str]]]:
    """Check the files of each candidate and collect the usable ones into a datalist.

    Candidates whose pair fails :py:func:`check_image_label_pair` are reported to ``report`` with their
    source file and row. Item order follows ``candidates``.

    Args:
        candidates: the items, in order.
        report: collects skipped items; raises in strict mode.
        verify: decode the files to detect truncated or corrupt ones and NaN or infinite values.
        num_workers: threads used to check files; default ``min(8, cpu count)``.
        progress: wraps the checks to show progress, see :py:data:`ProgressFn`.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``.

    Raises:
        DatalistError: from ``report`` in strict mode.
    """
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    progress = progress or _no_progress
    datalist: dict[str, list[dict[str, str]]] = {split: [] for split in DATALIST_SPLITS}
    checks = _checked_pairs(candidates, verify, num_workers)
    try:
        for candidate, problem in zip(candidates, progress(checks, len(candidates), "checking files")):
            if problem is not None:
                c = candidate
                report.skip(c.item_id, problem.reason, c.source_file, c.row, problem.detail, c.unit)
                continue
            datalist[candidate.split].append(candidate.to_datalist_item())
    finally:
        checks.close()  # stops the worker threads at once when strict mode raises
    return datalist


def check_datalist_files(
    datalist: Mapping[str, Any],
    report: SkipReport,
    source: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    verify: bool = True,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Check the image and mask of every item of an existing datalist; leave out (and report) the bad ones.

    The check is :py:func:`check_image_label_pair`, the one every converter runs (through
    :py:func:`build_datalist`): both files present and readable (the header always; decoded with ``verify``, so
    truncated files and NaN or infinite values are found), of the same spatial size. Each bad item goes to
    ``report`` with its entry number in ``source`` (so ``--strict`` stops at the first one). Items without
    string ``image`` and ``label`` paths and top-level keys that are not lists are kept unchanged.

    Args:
        datalist: a parsed datalist.
        report: collects skipped items; raises :py:class:`DatalistError` in strict mode.
        source: the datalist file, for the report.
        base_dir: the folder relative paths are resolved against (default: the folder of ``source``).
        verify: decode the files; False reads the headers only.
        num_workers: threads used to check files; default ``min(8, cpu count)``.

    Returns:
        The datalist without the bad items.

    Raises:
        DatalistError: from ``report`` in strict mode.

    Examples::

        report = SkipReport(strict=False)
        checked = check_datalist_files(json.loads(path.read_text()), report, source=path)
        print(report.summary())  # e.g. "skipped 1 (unreadable image: 1)"
    """
    base = Path(base_dir) if base_dir is not None else Path(source).absolute().parent
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)

    def resolve(path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else base / path

    result: dict[str, Any] = {}
    for key, items in datalist.items():
        if not isinstance(items, list):
            result[key] = items
            continue
        checkable = [
            isinstance(item, Mapping) and isinstance(item.get("image"), str) and isinstance(item.get("label"), str)
            for item in items
        ]
        pairs = [(resolve(item["image"]), resolve(item["label"])) for item, ok in zip(items, checkable) if ok]
        with ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="datalist-check") as executor:
            problems = iter(list(executor.map(lambda pair: check_image_label_pair(*pair, verify=verify), pairs)))
        kept = []
        for number, (item, ok) in enumerate(zip(items, checkable), start=1):
            problem = next(problems) if ok else None
            if problem is None:
                kept.append(item)
                continue
            item_id = f"{key}: {Path(item['image']).name}"
            report.skip(item_id, problem.reason, source, number, problem.detail, unit="entry")
        result[key] = kept
    return result


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
    problem = check_image_label_pair(image, label, verify=verify)
    if problem is not None:
        return problem
    try:
        size = read_spatial_size(image, verify=False)
    except UnreadableImageError as err:  # pragma: no cover - read just before
        return PairProblem(SkipReason.UNREADABLE_IMAGE, str(err))
    if len(size) > 2:
        return PairProblem(
            "3-D volume",
            f"{image} is a volume of size {_format_size(size)}; a 2-D image is expected (slice volumes first)",
        )
    return None


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
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datalist-check") as executor:
            problems = list(executor.map(lambda item: _item_problem(item, verify), items))
    else:
        problems = [_item_problem(item, verify) for item in items]
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
