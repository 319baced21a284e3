"""
Generate the synthetic chest-CT demo dataset (command line wrapper of :py:mod:`himix_monai.demo.slices`)::

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
from collections.abc import Callable
from pathlib import Path

from himix_monai.demo.slices import generate_demo_dataset

__all__ = ["build_parser", "demo_parser", "run_generator", "main"]


def demo_parser(prog: str, description: str, num: int, size: int, decoys_help: str) -> argparse.ArgumentParser:
    """The arguments both demo generators take: ``--out``, ``--num``, ``--seed``, ``--size`` and ``--decoys``.

    Args:
        prog: the ``python -m`` command shown in the usage.
        description: what the command does.
        num: default number of cases.
        size: default (in-plane) image size in pixels.
        decoys_help: what the decoys are.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--num", type=int, default=num, help=f"number of cases (default: {num})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--size", type=int, default=size, help=f"image size in pixels, at least 64 (default: {size})")
    parser.add_argument(
        "--decoys",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"add {decoys_help} (default: on; --no-decoys leaves them out)",
    )
    return parser


def run_generator(generate: Callable[[], Path], what: str) -> int:
    """Run ``generate()`` and print the datalist it wrote with its split sizes; an invalid setting (ValueError) is
    printed as ``error: ...`` on stderr. Returns the exit status.

    Args:
        generate: writes the dataset and returns its datalist path.
        what: what was written, e.g. ``"100 cases with decoys"``.
    """
    start = time.perf_counter()
    try:
        path = generate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    datalist = json.loads(path.read_text(encoding="utf-8"))
    counts = ", ".join(f"{split} {len(datalist[split])}" for split in ("training", "validation", "test"))
    print(f"wrote {path}: {what} ({counts}) in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line parser."""
    return demo_parser(
        "python -m data_prep.demo",
        "Generate the synthetic chest-CT demo dataset.",
        num=100,
        size=128,
        decoys_help="unreported, unmasked decoy lesions, so only a model that reads the report scores high",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_generator(
        lambda: generate_demo_dataset(args.out, num=args.num, seed=args.seed, size=args.size, decoys=args.decoys),
        f"{args.num} cases" + (" with decoys" if args.decoys else ""),
    )


if __name__ == "__main__":
    raise SystemExit(main())
