"""
Generate the synthetic chest-CT VOLUME demo dataset (command line wrapper of :py:mod:`himix_monai.demo.volumes`)::

    python -m data_prep.volume_demo --out DIR [--num 24] [--seed 0] [--size 64] [--depth 24] [--dicom-series N]
        [--no-decoys]

Writes ``DIR/images`` (3-D NIfTI in HU, the datalist ``image``), ``DIR/labels`` (3-D uint8 NIfTI masks),
``DIR/dicom/vol_XXXX/`` (the same volumes as CT DICOM series, ``image_dicom``) and ``DIR/datalist.json``
(70/15/15 % splits, one report per volume). Lesions are ellipsoids spanning several slices; decoys are tubes along the
slice axis that look like a lesion on one slice. Train on it with the bundle's ``--volume_data true
--dataset_dir DIR --context_slices 1``.
"""

from __future__ import annotations

import argparse

from data_prep.demo import demo_parser, run_generator
from himix_monai.demo.volumes import generate_volume_demo_dataset

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line parser."""
    parser = demo_parser(
        "python -m data_prep.volume_demo",
        "Generate the synthetic chest-CT volume demo dataset.",
        num=24,
        size=64,
        decoys_help="the unreported decoy tubes",
    )
    parser.add_argument("--depth", type=int, default=24, help="slices per volume, at least 8 (default: 24)")
    parser.add_argument(
        "--dicom-series",
        type=int,
        default=None,
        help="write only the first N volumes also as DICOM series (default: all)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_generator(
        lambda: generate_volume_demo_dataset(
            args.out, num=args.num, seed=args.seed, size=args.size, depth=args.depth, decoys=args.decoys,
            dicom_series=args.dicom_series,
        ),  # fmt: skip
        f"{args.num} volumes of {args.size}x{args.size}x{args.depth}",
    )


if __name__ == "__main__":
    raise SystemExit(main())
