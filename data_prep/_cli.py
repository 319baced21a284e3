"""Command-line plumbing shared by the dataset converters in ``data_prep``.

Each converter module defines how to turn one published layout into candidate items; this module gives
them the common arguments (``--root``, ``--out``, ``--strict``, ``--seed`` ...), logging of skipped items
(one warning per item, naming its file and row), progress bars, the atomic write of the datalist and the
summary line printed at the end::

    wrote /x/datalist.json: training=80 validation=10 test=10; skipped 3 (missing mask: 2, empty description: 1)

A converter's ``main`` parses its arguments with a parser from :py:func:`build_parser` and hands a
:py:data:`ConvertFn` to :py:func:`run_converter`, which returns the process exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from himix_monai.data.datalist import (
    DATALIST_SPLITS,
    DatalistError,
    ProgressFn,
    SkipReport,
    build_datalist,
    write_datalist,
)

__all__ = [
    "LOGGER",
    "ConvertFn",
    "build_parser",
    "configure_logging",
    "make_progress",
    "format_summary",
    "check_candidates",
    "find_child",
    "run_converter",
]

LOGGER = logging.getLogger("data_prep")
"""Logger of all converters: warnings for skipped items, notes and errors go to stderr."""

ConvertFn = Callable[[argparse.Namespace, SkipReport, ProgressFn], dict]
"""``convert(args, report, progress) -> datalist``: the dataset-specific part of a converter."""


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


def format_summary(out: Path, datalist: dict[str, list], report: SkipReport) -> str:
    """The summary line, e.g. ``wrote /x/d.json: training=80 validation=10 test=10; skipped 1 (missing mask: 1)``.

    Args:
        out: the datalist written.
        datalist: its content.
        report: the skipped items.
    """
    counts = " ".join(f"{split}={len(datalist.get(split, []))}" for split in DATALIST_SPLITS)
    return f"wrote {out}: {counts}; {report.summary()}"


def check_candidates(
    candidates: list, args: argparse.Namespace, report: SkipReport, progress: ProgressFn
) -> dict[str, list[dict[str, str]]]:
    """Check the files of the candidate items with the options in ``args`` and build the datalist.

    Args:
        candidates: :py:class:`~himix_monai.data.datalist.CandidateItem` objects, in order.
        args: parsed arguments (``verify``, ``workers``).
        report: collects skipped items.
        progress: progress wrapper.
    """
    return build_datalist(candidates, report, verify=args.verify, num_workers=args.workers, progress=progress)


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
    print(format_summary(out, datalist, report))
    return 0
