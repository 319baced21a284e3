"""What the dataset converters in ``data_prep`` share.

Each converter module defines how to turn one published layout into candidate items; this module gives
them the common arguments (``--root``, ``--out``, ``--strict``, ``--seed`` ...), the folder lookups, the reading
of ``Image``/``Description`` sheets into candidates (:py:func:`sheet_candidates`), the file checks
(:py:func:`build_datalist`), logging of skipped items (one warning per item, naming its file and row), progress
bars, the atomic write of the datalist and the summary line printed at the end::

    wrote /x/datalist.json: training=80 validation=10 test=10; skipped 3 (missing mask: 2, empty description: 1)

A converter's ``main`` parses its arguments with a parser from :py:func:`build_parser` and hands a
:py:data:`ConvertFn` to :py:func:`run_converter`, which returns the process exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from himix_monai.data.datalist import DATALIST_SPLITS, write_datalist
from himix_monai.data.file_matching import DirectoryIndex, FileMatch, find_mask_file, mask_name_candidates
from himix_monai.data.image_checks import check_image_label_pair, check_in_threads
from himix_monai.data.sheets import SheetRow
from himix_monai.data.skip_report import SkipReason, SkipReport
from himix_monai.errors import DatalistError

__all__ = [
    "LOGGER",
    "ConvertFn",
    "ProgressFn",
    "CandidateItem",
    "build_parser",
    "configure_logging",
    "make_progress",
    "build_datalist",
    "check_datalist_files",
    "find_child",
    "find_split_children",
    "required_folder",
    "ImageMaskFolder",
    "image_mask_folder",
    "note_extension_mismatch",
    "note_unlisted_images",
    "sheet_candidates",
    "run_converter",
]

LOGGER = logging.getLogger("data_prep")
"""Logger of all converters: warnings for skipped items, notes and errors go to stderr."""

ProgressFn = Callable[[Iterable[Any], int, str], Iterable[Any]]
"""``progress(iterable, total, description)`` wraps an iterable to show progress (e.g. with tqdm)."""

ConvertFn = Callable[[argparse.Namespace, SkipReport, ProgressFn], dict]
"""``convert(args, report, progress) -> datalist``: the dataset-specific part of a converter."""


@dataclass(frozen=True)
class CandidateItem:
    """An item a converter wants to put into the datalist, before its files are checked.

    Args:
        split: the datalist split.
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


class _TqdmStderrHandler(logging.Handler):
    """Writes log records to the current ``sys.stderr`` without breaking tqdm progress bars."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def configure_logging(verbose: bool = False) -> None:
    """Send the ``data_prep`` logger's records to stderr (once), as ``warning: ...`` / ``error: ...`` lines.

    Args:
        verbose: also show debug messages.
    """
    if not any(isinstance(handler, _TqdmStderrHandler) for handler in LOGGER.handlers):
        LOGGER.addHandler(_TqdmStderrHandler())
        LOGGER.propagate = False
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every converter has.

    Args:
        prog: the program name, e.g. ``python -m data_prep.lvit``.
        description: what the converter reads.

    Returns:
        A parser with ``--root``, ``--out``, ``--strict``, ``--seed``, ``--workers``, ``--no-verify``,
        ``--no-progress`` and ``--verbose``; converters add their own options.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True, help="root folder of the dataset as published")
    parser.add_argument("--out", type=Path, required=True, help="datalist JSON file to write (replaced atomically)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error at the first bad item instead of skipping it; --out is then left unchanged",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the random choices a converter makes (e.g. a random validation split); "
        "without it the choices are the deterministic published ones",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="threads used to check image files (default: min(8, CPUs))"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="read image headers only: faster, but truncated or corrupt files are not detected",
    )
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="hide progress bars (they are shown only when stderr is a terminal)",
    )
    parser.add_argument("--verbose", action="store_true", help="show debug messages")
    return parser


def make_progress(enabled: bool) -> ProgressFn:
    """A progress wrapper: tqdm bars on stderr when ``enabled`` and stderr is a terminal, else a pass-through.

    Args:
        enabled: show progress bars.
    """

    def progress(iterable: Iterable[Any], total: int, description: str) -> Iterable[Any]:
        if not enabled or not sys.stderr.isatty():
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=description, unit="item", file=sys.stderr, leave=False)

    return progress


def build_datalist(
    candidates: Sequence[CandidateItem], args: argparse.Namespace, report: SkipReport, progress: ProgressFn
) -> dict[str, list[dict[str, str]]]:
    """Check the files of each candidate (:py:func:`~himix_monai.data.image_checks.check_image_label_pair`) and
    collect the usable ones, in order, into a datalist with absolute paths; bad ones go to ``report`` with their
    source file and row (``--strict``: the first one raises and the checks not started are cancelled).

    Args:
        candidates: the items, in order.
        args: parsed arguments (``verify``, ``workers``).
        report: collects skipped items.
        progress: progress wrapper.
    """
    datalist: dict[str, list[dict[str, str]]] = {split: [] for split in DATALIST_SPLITS}
    pairs = [(c.image, c.label) for c in candidates]
    checks = check_in_threads(lambda pair: check_image_label_pair(*pair, verify=args.verify), pairs, args.workers)
    try:
        for c, problem in zip(candidates, progress(checks, len(candidates), "checking files")):
            if problem is not None:
                report.skip(c.item_id, problem.reason, c.source_file, c.row, problem.detail, c.unit)
                continue
            item = {"image": str(Path(c.image).resolve()), "label": str(Path(c.label).resolve()), "text": c.text}
            datalist[c.split].append(item)
    finally:
        checks.close()
    return datalist


def check_datalist_files(
    datalist: Mapping[str, Any], report: SkipReport, source: Path, verify: bool = True
) -> dict[str, Any]:
    """Leave out (and report, as ``entry N of source``) the items of an existing datalist whose image/mask pair
    fails :py:func:`~himix_monai.data.image_checks.check_image_label_pair`, the check every converter runs.

    Relative paths are resolved against the folder of ``source``; items without string ``image`` and ``label``
    paths and top-level keys that are not lists are kept unchanged.

    Raises:
        DatalistError: from ``report`` in strict mode.
    """
    base = source.absolute().parent
    result: dict[str, Any] = {}
    for key, items in datalist.items():
        if not isinstance(items, list):
            result[key] = items
            continue
        result[key] = []
        checkable = [isinstance(i, Mapping) and isinstance(i.get("image"), str) and isinstance(i.get("label"), str)
                     for i in items]
        pairs = [(base / i["image"], base / i["label"]) for i, ok in zip(items, checkable) if ok]
        problems = iter(list(check_in_threads(lambda pair: check_image_label_pair(*pair, verify=verify), pairs)))
        for number, (item, ok) in enumerate(zip(items, checkable), start=1):
            problem = next(problems) if ok else None
            if problem is None:
                result[key].append(item)
            else:
                item_id = f"{key}: {Path(item['image']).name}"
                report.skip(item_id, problem.reason, source, number, problem.detail, "entry")
    return result


def find_child(parent: Path, names: Iterable[str], want_dir: bool = True) -> Path | None:
    """Find an entry of ``parent`` whose name is one of ``names``, ignoring case.

    An exact-case match wins; otherwise the first entry (sorted by name) matching one of ``names`` in order.

    Args:
        parent: the folder to look in.
        names: the accepted names, most preferred first.
        want_dir: look for a folder (True) or a file (False).

    Returns:
        The entry, or None.
    """
    if not parent.is_dir():
        return None
    entries = sorted(entry for entry in parent.iterdir() if entry.is_dir() == want_dir)
    names = list(names)
    for name in names:
        for entry in entries:
            if entry.name == name:
                return entry
    for name in names:
        for entry in entries:
            if entry.name.lower() == name.lower():
                return entry
    return None


def find_split_children(
    parent: Path, names: Mapping[str, str | Sequence[str]], want_dir: bool = True
) -> dict[str, Path]:
    """The entry of ``parent`` for each split that has one (see :py:func:`find_child`).

    Args:
        parent: the folder to look in.
        names: for each datalist split, its accepted name or names, most preferred first.
        want_dir: look for folders (True) or files (False).
    """
    found = {split: find_child(parent, [n] if isinstance(n, str) else n, want_dir) for split, n in names.items()}
    return {split: path for split, path in found.items() if path is not None}


def required_folder(parent: Path, name: str, holding: str = "") -> Path:
    """The sub-folder ``name`` of ``parent`` (matched ignoring case).

    Raises:
        DatalistError: naming ``parent`` and the folder it lacks (with what it should hold, ``holding``).
    """
    folder = find_child(parent, [name])
    if folder is None:
        raise DatalistError(f"{parent}: lacks the {name!r} folder{holding}")
    return folder


@dataclass(frozen=True)
class ImageMaskFolder:
    """A folder and the listings of its image and mask sub-folders.

    Args:
        folder: e.g. ``ROOT/Train_Folder``.
        images: listing of the image folder (``img``, ``Images``, ...).
        masks: listing of the mask folder (``labelcol``, ``GTs``, ...).
    """

    folder: Path
    images: DirectoryIndex
    masks: DirectoryIndex


def image_mask_folder(folder: Path, image_folder: str, mask_folder: str) -> ImageMaskFolder:
    """``folder`` with the listings of its image and mask sub-folders (see :py:func:`required_folder`)."""
    images, masks = (DirectoryIndex(required_folder(folder, name)) for name in (image_folder, mask_folder))
    return ImageMaskFolder(folder, images, masks)


def note_extension_mismatch(report: SkipReport, match: FileMatch, listed_in: str) -> None:
    """Count a file found by its stem (``listed_in`` names the annotation kind, e.g. ``"sheet"``) in one note."""
    if match.by_stem:
        example = f"{listed_in} {match.requested!r} -> {match.path.name!r}"
        report.add_note("extension mismatch", "resolved {count} extension mismatches", example)


def note_unlisted_images(
    indexes: Iterable[DirectoryIndex], listed_images: set[Path], report: SkipReport, listing: str
) -> None:
    """One note per image folder counting its images that no annotation (``listing``, e.g. ``"csv"``) names."""
    for index in {index.folder: index for index in indexes}.values():
        for name in index.image_names():
            if index.folder / name not in listed_images:
                summary = f"{{count}} image(s) in {index.folder} are not listed in any {listing}"
                report.add_note(f"unlisted {index.folder}", summary, repr(name))


Located = tuple[str, FileMatch, DirectoryIndex]
"""Where a sheet row's image is: ``(datalist split, the image file, the listing of its mask folder)``."""


def sheet_candidates(
    sheet: Path,
    rows: Sequence[SheetRow],
    locate: Callable[[str], Located | str],
    report: SkipReport,
    listed_images: set[Path],
    targets: Sequence[str] = DATALIST_SPLITS,
    listed_in: str = "sheet",
) -> list[CandidateItem]:
    """The candidate items of the ``Image``/``Description`` rows of one sheet; bad rows go to ``report``.

    Args:
        sheet: the sheet (or csv) file.
        rows: its rows.
        locate: finds a row's image by name: a :py:data:`Located`, or where it looked when it is not found.
        report: collects skipped rows.
        listed_images: updated with every image file a row refers to.
        targets: the splits this sheet is used for; rows whose image is in another split are left to the sheet
            of that split.
        listed_in: the annotation kind named in the extension-mismatch note.
    """
    candidates, first_row_by_name = [], {}
    for row in rows:
        name = row.image
        if not name:
            report.skip(name, SkipReason.MISSING_IMAGE, sheet, row.row, "the Image cell is empty")
            continue
        if name in first_row_by_name:
            detail = f"already listed in row {first_row_by_name[name]}; keeping the first"
            report.skip(name, SkipReason.DUPLICATE_ID, sheet, row.row, detail)
            continue
        first_row_by_name[name] = row.row
        located = locate(name)
        if not isinstance(located, str):
            listed_images.add(located[1].path)
            if located[0] not in targets:
                continue  # the image's folder takes its descriptions from another sheet
        if not row.description:
            report.skip(name, SkipReason.EMPTY_DESCRIPTION, sheet, row.row, "the Description cell is empty")
            continue
        if isinstance(located, str):
            report.skip(name, SkipReason.MISSING_IMAGE, sheet, row.row, located)
            continue
        split, image, masks = located
        note_extension_mismatch(report, image, listed_in)
        mask = find_mask_file(masks, name, image.path.name)
        if mask is None:
            tried = " or ".join(map(repr, mask_name_candidates(name, image.path.name)))
            report.skip(name, SkipReason.MISSING_MASK, sheet, row.row, f"no {tried} in {masks.folder}")
            continue
        note_extension_mismatch(report, mask, listed_in)
        candidates.append(CandidateItem(split, name, image.path, mask.path, row.description, sheet, row.row))
    return candidates


def _fail(message: str, out: Path) -> int:
    """Log an error and that nothing was written; return the exit code 1."""
    LOGGER.error("%s", message)
    LOGGER.error("no datalist written; %s", f"{out} left unchanged" if out.exists() else f"{out} not created")
    return 1


def run_converter(args: argparse.Namespace, convert: ConvertFn) -> int:
    """Run a converter: convert, write the datalist atomically, print the notes and the summary line.

    Nothing is written when the conversion fails (in strict mode at the first bad item) or finds no usable
    item, so an existing ``--out`` is left unchanged.

    Args:
        args: parsed arguments from a parser made by :py:func:`build_parser`.
        convert: the dataset-specific conversion.

    Returns:
        The exit code: 0 on success, 1 on error.
    """
    configure_logging(args.verbose)
    report = SkipReport(strict=args.strict, logger=LOGGER)
    try:
        if not args.root.is_dir():
            raise DatalistError(f"--root {args.root}: not a folder")
        datalist = convert(args, report, make_progress(args.progress))
        if not any(datalist.get(split) for split in DATALIST_SPLITS):
            raise DatalistError(f"no usable item found under {args.root}; {report.summary()}")
    except (DatalistError, OSError) as err:
        return _fail(str(err), args.out)
    try:
        out = write_datalist(datalist, args.out)
    except (DatalistError, OSError) as err:
        return _fail(f"cannot write {args.out}: {err}", args.out)
    for note in report.notes():
        print(f"note: {note}")
    counts = " ".join(f"{split}={len(datalist.get(split, []))}" for split in DATALIST_SPLITS)
    print(f"wrote {out}: {counts}; {report.summary()}")
    return 0
