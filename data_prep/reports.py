"""
Write structured lesion reports from masks (command line wrapper of :py:mod:`himix_monai.mask_reports`).

Fill the ``text`` of every datalist item from its ``label`` mask::

    python -m data_prep.reports --datalist IN.json --out OUT.json [--style chest|generic] [--min-size N]
        [--overwrite-text] [--lung-key lung_mask] [--noun polyp]

or write an ``Image,Description`` CSV (the LViT/GuideDecoder sheet format) for a folder of masks::

    python -m data_prep.reports --masks DIR --out OUT.csv [--style chest|generic] [--min-size N]

``--min-size`` is in pixels when >= 1 and a fraction of the image when < 1 (default 0.001). Outputs are
written atomically; a summary line is printed at the end.

Like the other converters, every image and mask the output lists is checked first (present, readable, same
size; :py:func:`data_prep._cli.check_datalist_files`): a bad item is left out with a warning naming
it and counted in the summary; ``--strict`` stops at the first one and writes nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from data_prep._cli import LOGGER, check_datalist_files, configure_logging
from himix_monai.data.datalist import DatalistError, write_datalist
from himix_monai.mask_reports import DEFAULT_MIN_SIZE, REPORT_STYLES, read_mask, report_from_mask
from himix_monai.data.skip_report import SkipReason, SkipReport
from himix_monai.files import IMAGE_EXTENSIONS, write_text_atomically

__all__ = ["build_parser", "fill_datalist_reports", "main"]


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


def fill_datalist_reports(
    datalist: dict[str, Any], style: str, overwrite: bool, base_dir: Path, lung_key: str | None, source: str, **kwargs
) -> tuple[dict[str, Any], int]:
    """Write the report of each item's ``label`` mask into its ``text``; return the new datalist and the count.

    Every list of items is processed (other top-level keys are copied); only missing or empty texts are filled
    unless ``overwrite``. Relative paths are resolved against ``base_dir``; ``lung_key`` names an item key of a
    lung mask (chest style); ``kwargs`` go to :py:func:`~himix_monai.mask_reports.report_from_mask`.

    Raises:
        ValueError: naming the datalist, split, item and file for a missing ``label`` or an unreadable mask.
    """
    filled, result = 0, {}
    for key, value in datalist.items():
        if not isinstance(value, list):
            result[key] = value
            continue
        result[key] = []
        for position, item in enumerate(value, start=1):
            where = f"{source}: {key!r} item {position}"
            if not isinstance(item, dict) or not item.get("label"):
                raise ValueError(f"{where}: has no 'label' mask path")
            item = dict(item)
            if overwrite or not str(item.get("text") or "").strip():
                try:
                    mask = read_mask(base_dir / item["label"])
                    lungs = read_mask(base_dir / item[lung_key]) if lung_key and item.get(lung_key) else None
                    item["text"] = report_from_mask(mask, style, lungs, **kwargs)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from err
                filled += 1
            result[key].append(item)
    return result, filled


def _run_datalist(args: argparse.Namespace, report_kwargs: dict, report: SkipReport) -> str:
    source = args.datalist
    try:
        datalist = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{source}: cannot read datalist JSON: {err}") from err
    if not isinstance(datalist, dict):
        raise ValueError(f"{source}: a datalist must be a JSON object")
    base_dir = source.absolute().parent
    datalist = check_datalist_files(datalist, report, source, verify=args.verify)
    if not any(isinstance(value, list) and value for value in datalist.values()):
        raise ValueError(f"{source}: no usable item; {report.summary()}")
    result, filled = fill_datalist_reports(
        datalist, args.style, args.overwrite_text, base_dir, args.lung_key, str(source), **report_kwargs
    )
    total = sum(len(value) for value in result.values() if isinstance(value, list))
    path = write_datalist(result, args.out)
    return f"wrote {path}: {filled} of {total} item texts written from masks ({args.style} style); {report.summary()}"


def _run_masks(args: argparse.Namespace, report_kwargs: dict, report: SkipReport) -> str:
    """An ``Image,Description`` CSV (the LViT/GuideDecoder sheet format) of the mask files of a folder."""
    if not args.masks.is_dir():
        raise ValueError(f"{args.masks}: mask folder not found")
    rows = []
    for path in sorted(args.masks.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_EXTENSIONS):
            try:
                rows.append((path.name, report_from_mask(read_mask(path), args.style, **report_kwargs)))
            except ValueError as err:
                report.skip(path.name, SkipReason.UNREADABLE_MASK, args.masks, detail=str(err))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([("Image", "Description"), *rows])
    path = write_text_atomically(args.out.absolute(), buffer.getvalue(), newline="")
    return f"wrote {path}: {len(rows)} reports for the masks of {args.masks} ({args.style} style); {report.summary()}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    report_kwargs = {"min_size": args.min_size, **({"noun": args.noun} if args.style == "generic" else {})}
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
