"""
Generate the synthetic chest-CT demo dataset (command line wrapper of :py:mod:`himix_monai.data.demo`)::

    python -m data_prep.demo --out DIR [--num 100] [--seed 0] [--size 128] [--no-decoys]

Writes ``DIR/images`` (2-D NIfTI in HU, the datalist ``image``), ``DIR/dicom`` (the same slices as CT DICOM),
``DIR/labels`` and ``DIR/lungs`` (uint8 NIfTI masks) and ``DIR/datalist.json`` (70/15/15 % splits) with
QaTa-COV19 style reports. The same seed gives the same data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from himix_monai.data.demo import generate_demo_dataset

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.demo", description="Generate the synthetic chest-CT demo dataset."
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num", type=int, default=100, help="number of cases (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels, at least 64 (default: 128)")
    parser.add_argument(
        "--decoys",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add unreported, unmasked decoy lesions, so only a model that reads the report scores high "
        "(default: on; --no-decoys leaves them out)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        path = generate_demo_dataset(args.out, num=args.num, seed=args.seed, size=args.size, decoys=args.decoys)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    datalist = json.loads(path.read_text(encoding="utf-8"))
    counts = ", ".join(f"{split} {len(datalist[split])}" for split in ("training", "validation", "test"))
    decoys = " with decoys" if args.decoys else ""
    print(f"wrote {path}: {args.num} cases{decoys} ({counts}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
