"""
Write structured lesion reports from masks (command line wrapper of :py:mod:`himix_monai.data.reports`).

Fill the ``text`` of every datalist item from its ``label`` mask::

    python -m data_prep.reports --datalist IN.json --out OUT.json [--style chest|generic] [--min-size N]
        [--overwrite-text] [--lung-key lung_mask] [--noun polyp]

or write an ``Image,Description`` CSV (the LViT/GuideDecoder sheet format) for a folder of masks::

    python -m data_prep.reports --masks DIR --out OUT.csv [--style chest|generic] [--min-size N]

``--min-size`` is in pixels when >= 1 and a fraction of the image when < 1 (default 0.001). Outputs are
written atomically; a summary line is printed at the end.

Like the other converters, every image and mask the output lists is checked first (present, readable, same
size; :py:func:`himix_monai.data.datalist.check_datalist_files`): a bad item is left out with a warning naming
it and counted in the summary; ``--strict`` stops at the first one and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep._cli import LOGGER, configure_logging
from himix_monai.data.datalist import DatalistError, SkipReason, SkipReport, check_datalist_files, write_datalist
from himix_monai.data.reports import (
    DEFAULT_MIN_SIZE,
    REPORT_STYLES,
    fill_datalist_reports,
    mask_folder_reports,
    write_reports_csv,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line parser."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.reports", description=__doc__.split("\n\n")[1])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--datalist", type=Path, help="input datalist JSON; every item's text is filled from its label")
    source.add_argument("--masks", type=Path, help="folder of masks; writes an Image,Description CSV")
    parser.add_argument("--out", type=Path, required=True, help="output datalist JSON (or CSV with --masks)")
    parser.add_argument("--style", choices=REPORT_STYLES, default="chest", help="report style (default: chest)")
    parser.add_argument(
        "--min-size", type=float, default=DEFAULT_MIN_SIZE,
        help=f"ignore lesions smaller than this: pixels if >= 1, image fraction if < 1 (default: {DEFAULT_MIN_SIZE})",
    )
    parser.add_argument(
        "--overwrite-text", action="store_true", help="replace existing texts (default: fill empty ones only)"
    )
    parser.add_argument("--lung-key", help="datalist item key of a lung mask defining the lung field (chest style)")
    parser.add_argument("--noun", default="polyp", help="lesion noun of the generic style (default: polyp)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop with an error at the first bad item (missing, unreadable or corrupt file); --out is then left "
        "unchanged",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="read image headers only: faster, but truncated or corrupt pixel data is not detected",
    )
    return parser


def _run_datalist(args: argparse.Namespace, report_kwargs: dict, report: SkipReport) -> str:
    source = args.datalist
    try:
        datalist = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{source}: cannot read datalist JSON: {err}") from err
    if not isinstance(datalist, dict):
        raise ValueError(f"{source}: a datalist must be a JSON object")
    datalist = check_datalist_files(datalist, report, source, base_dir=source.absolute().parent, verify=args.verify)
    if not any(isinstance(value, list) and value for value in datalist.values()):
        raise ValueError(f"{source}: no usable item; {report.summary()}")
    result, filled = fill_datalist_reports(
        datalist, style=args.style, min_size=args.min_size, overwrite=args.overwrite_text,
        base_dir=source.absolute().parent, lung_key=args.lung_key, source=str(source), **report_kwargs,
    )
    total = sum(len(value) for value in result.values() if isinstance(value, list))
    path = write_datalist(result, args.out)
    return f"wrote {path}: {filled} of {total} item texts written from masks ({args.style} style); {report.summary()}"


def _run_masks(args: argparse.Namespace, report_kwargs: dict, report: SkipReport) -> str:
    def unreadable(path: Path, message: str) -> None:
        report.skip(path.name, SkipReason.UNREADABLE_MASK, args.masks, detail=message)

    rows = mask_folder_reports(
        args.masks, style=args.style, min_size=args.min_size, on_unreadable=unreadable, **report_kwargs
    )
    path = write_reports_csv(rows, args.out)
    return f"wrote {path}: {len(rows)} reports for the masks of {args.masks} ({args.style} style); {report.summary()}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    report_kwargs = {"noun": args.noun} if args.style == "generic" else {}
    if args.lung_key and args.style != "chest":
        print("error: --lung-key is only used by the chest style", file=sys.stderr)
        return 2
    configure_logging()
    report = SkipReport(strict=args.strict, logger=LOGGER)
    try:
        run = _run_datalist if args.datalist else _run_masks
        summary = run(args, report_kwargs, report)
    except DatalistError as err:  # --strict: the first bad item
        print(f"error: {err}", file=sys.stderr)
        print(f"error: no output written; {args.out} left unchanged", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
