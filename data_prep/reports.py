"""
Write structured lesion reports from masks (command line wrapper of :py:mod:`himix_monai.data.reports`).

Fill the ``text`` of every datalist item from its ``label`` mask::

    python -m data_prep.reports --datalist IN.json --out OUT.json [--style chest|generic] [--min-size N]
        [--overwrite-text] [--lung-key lung_mask] [--noun polyp]

or write an ``Image,Description`` CSV (the LViT/GuideDecoder sheet format) for a folder of masks::

    python -m data_prep.reports --masks DIR --out OUT.csv [--style chest|generic] [--min-size N]

``--min-size`` is in pixels when >= 1 and a fraction of the image when < 1 (default 0.001). Outputs are
written atomically; a summary line is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from himix_monai.data.datalist import write_datalist
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
    return parser


def _run_datalist(args: argparse.Namespace, report_kwargs: dict) -> str:
    source = args.datalist
    try:
        datalist = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{source}: cannot read datalist JSON: {err}") from err
    if not isinstance(datalist, dict):
        raise ValueError(f"{source}: a datalist must be a JSON object")
    result, filled = fill_datalist_reports(
        datalist, style=args.style, min_size=args.min_size, overwrite=args.overwrite_text,
        base_dir=source.absolute().parent, lung_key=args.lung_key, source=str(source), **report_kwargs,
    )
    total = sum(len(value) for value in result.values() if isinstance(value, list))
    path = write_datalist(result, args.out)
    return f"wrote {path}: {filled} of {total} item texts written from masks ({args.style} style)"


def _run_masks(args: argparse.Namespace, report_kwargs: dict) -> str:
    rows = mask_folder_reports(args.masks, style=args.style, min_size=args.min_size, **report_kwargs)
    path = write_reports_csv(rows, args.out)
    return f"wrote {path}: {len(rows)} reports for the masks of {args.masks} ({args.style} style)"


def main(argv: list[str] | None = None) -> int:
    """Run the command line tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    report_kwargs = {"noun": args.noun} if args.style == "generic" else {}
    if args.lung_key and args.style != "chest":
        print("error: --lung-key is only used by the chest style", file=sys.stderr)
        return 2
    try:
        summary = _run_datalist(args, report_kwargs) if args.datalist else _run_masks(args, report_kwargs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
