"""Convert a dataset in the "csv" layout of GuideDecoder and HiMix (QaTa-COV19, MosMedData+) to a HiMix datalist.

(The module is called ``prompt_csv`` rather than ``csv`` so that it does not shadow the standard library.)

Layout::

    ROOT/
        prompt/train.csv  [val.csv]  test.csv     columns: Image, Description
        train/Images/  train/GTs/                 split folders in any case: Train, train, ...
        [val/Images/   val/GTs/]
        test/Images/   test/GTs/

Masks are named like their image (MosMedData+, whose masks are 3-channel) or ``mask_<image name>``
(QaTa-COV19). In GuideDecoder's QaTa csv files the ``Image`` column holds the mask name
(``mask_covid_1.png``) while the image file is ``covid_1.png``; in HiMix's it holds the image name. Both
work: the prefix is stripped to find the image and added to find the mask.

Validation: ``val.csv`` when it exists (its images are looked up in the val folder, or in the train folder
when there is none). Otherwise the last ``--val-fraction`` (default 0.2) of the usable train.csv rows (picked
after their files are checked, so that bad files never empty the validation split) become the validation
split, as GuideDecoder does; with ``--seed`` the validation rows are drawn at random instead.

Usage::

    python -m data_prep.prompt_csv --root DIR --out DATALIST.json [--strict] [--val-fraction 0.2]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from data_prep._cli import LOGGER, CandidateItem, ImageMaskFolder, Located, ProgressFn, build_datalist, build_parser
from data_prep._cli import find_child, find_split_children, image_mask_folder, note_unlisted_images, required_folder
from data_prep._cli import run_converter, sheet_candidates
from himix_monai.data.file_matching import MASK_PREFIX, find_image_file
from himix_monai.data.sheets import read_description_sheet
from himix_monai.data.skip_report import SkipReport
from himix_monai.errors import DatalistError

__all__ = [
    "PROMPT_FOLDER",
    "CSV_NAMES",
    "SPLIT_FOLDER_NAMES",
    "IMAGE_FOLDER",
    "MASK_FOLDER",
    "DEFAULT_VAL_FRACTION",
    "find_csv_files",
    "find_image_folder",
    "validation_rows",
    "convert",
    "build_argument_parser",
    "main",
]

PROMPT_FOLDER = "prompt"
CSV_NAMES: dict[str, tuple[str, ...]] = {
    "training": ("train.csv",),
    "validation": ("val.csv", "valid.csv", "validation.csv"),
    "test": ("test.csv",),
}
"""Accepted csv names per datalist split (any case)."""

SPLIT_FOLDER_NAMES: dict[str, tuple[str, ...]] = {
    "training": ("train",),
    "validation": ("val", "valid", "validation"),
    "test": ("test",),
}
"""Accepted image folder names per datalist split (any case)."""

IMAGE_FOLDER = "Images"
MASK_FOLDER = "GTs"
DEFAULT_VAL_FRACTION = 0.2


def find_csv_files(root: Path) -> dict[str, Path]:
    """Find ``prompt/{train,val,test}.csv`` (any case).

    Args:
        root: the dataset root.

    Returns:
        The csv files found, keyed by datalist split.

    Raises:
        DatalistError: when there is no prompt folder or no csv in it.
    """
    prompt = required_folder(root, PROMPT_FOLDER, " with train.csv/val.csv/test.csv")
    csv_files = find_split_children(prompt, CSV_NAMES, want_dir=False)
    if not csv_files:
        raise DatalistError(f"{prompt}: none of train.csv, val.csv, test.csv found")
    return csv_files


def find_image_folder(root: Path, split: str) -> ImageMaskFolder | None:
    """Find the image folder of a split (``Train``/``train`` ...) with its ``Images`` and ``GTs``.

    Args:
        root: the dataset root.
        split: the datalist split.

    Returns:
        The folder, or None when there is none.

    Raises:
        DatalistError: when the folder lacks ``Images`` or ``GTs``.
    """
    folder = find_child(root, SPLIT_FOLDER_NAMES[split])
    return None if folder is None else image_mask_folder(folder, IMAGE_FOLDER, MASK_FOLDER)


def validation_rows(num_rows: int, fraction: float, seed: int | None = None) -> set[int]:
    """The positions of the train.csv rows that become validation rows.

    Without a seed these are the last ``num_rows - int((1 - fraction) * num_rows)`` rows, GuideDecoder's rule;
    with a seed the same number of rows drawn at random.

    Args:
        num_rows: number of rows in train.csv.
        fraction: fraction of rows for validation, in [0, 1).
        seed: seed of the random draw; None for the last rows.

    Returns:
        0-based row positions.
    """
    num_train = int((1 - fraction) * num_rows)
    if seed is None:
        return set(range(num_train, num_rows))
    return set(random.Random(seed).sample(range(num_rows), num_rows - num_train))


def _image_locator(folder: ImageMaskFolder, split: str):
    """Find a row's image in ``folder``: as written, else without its ``mask_`` prefix (GuideDecoder's QaTa csv)."""

    def locate(name: str) -> Located | str:
        image = find_image_file(folder.images, name)
        if image is not None:
            return split, image, folder.masks
        names = [name, name[len(MASK_PREFIX) :]] if name.startswith(MASK_PREFIX) else [name]
        return f"no {' or '.join(map(repr, names))} in {folder.images.folder}"

    return locate


def _csv_image_folder(root: Path, split: str, csv_file: Path, report: SkipReport) -> ImageMaskFolder:
    """The image folder of a csv file; val.csv falls back to the train folder when there is no val folder.

    Raises:
        DatalistError: when there is no folder for the csv file.
    """
    folder = find_image_folder(root, split)
    if folder is None and split == "validation":
        folder = find_image_folder(root, "training")
        if folder is not None:
            report.add_note("val folder", f"no val folder: {csv_file.name} images are looked up in {folder.folder}")
    if folder is None:
        names = "/".join(SPLIT_FOLDER_NAMES[split])
        raise DatalistError(f"{csv_file} lists {split} items but {root} has no {names} folder (any case)")
    return folder


def _carve_validation(datalist: dict, fraction: float, seed: int | None, csv_name: str, report: SkipReport) -> None:
    """Move ``fraction`` of the usable training items (checked files) to the validation split, GuideDecoder's rule.

    Picking before the files are checked could choose only rows whose files are missing or corrupt and so write
    an empty validation split.
    """
    training = datalist["training"]
    chosen = validation_rows(len(training), fraction, seed)
    datalist["training"] = [item for position, item in enumerate(training) if position not in chosen]
    datalist["validation"] = [item for position, item in enumerate(training) if position in chosen]
    rule = "the last" if seed is None else f"a random (seed {seed})"
    message = (
        f"no val.csv: took {rule} {fraction:.0%} of the usable {csv_name} rows "
        f"({len(chosen)} of {len(training)}) as validation"
    )
    report.add_note("val fraction", message)


def convert(args: argparse.Namespace, report: SkipReport, progress: ProgressFn) -> dict:
    """Convert the csv-layout dataset at ``args.root`` to a datalist.

    Args:
        args: parsed arguments (``root``, ``val_fraction``, ``seed`` ...).
        report: collects skipped items.
        progress: progress wrapper.

    Returns:
        The datalist.
    """
    root = args.root
    csv_files = find_csv_files(root)
    val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    if "validation" in csv_files:
        if args.val_fraction is not None:
            LOGGER.warning("--val-fraction ignored: %s exists", csv_files["validation"])
        val_fraction = 0.0
    candidates: list[CandidateItem] = []
    listed_images: set[Path] = set()
    folders = []
    all_rows = {split: read_description_sheet(csv_file) for split, csv_file in csv_files.items()}
    for split, csv_file in csv_files.items():
        folders.append(_csv_image_folder(root, split, csv_file, report))
        locate, rows = _image_locator(folders[-1], split), all_rows[split]
        candidates.extend(sheet_candidates(csv_file, rows, locate, report, listed_images, listed_in="csv"))
    note_unlisted_images((f.images for f in folders), listed_images, report, "csv")
    datalist = build_datalist(candidates, args, report, progress)
    if val_fraction > 0 and "training" in csv_files:
        _carve_validation(datalist, val_fraction, args.seed, csv_files["training"].name, report)
    return datalist


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_argument_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m data_prep.prompt_csv``."""
    parser = build_parser("python -m data_prep.prompt_csv", (__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        default=None,
        help=f"when there is no val.csv, fraction of train.csv rows taken as validation "
        f"(the last rows, or random ones with --seed; default {DEFAULT_VAL_FRACTION}; 0 for none)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.prompt_csv --root DIR --out DATALIST.json [--strict]``; returns the exit code."""
    return run_converter(build_argument_parser().parse_args(argv), convert)


if __name__ == "__main__":
    raise SystemExit(main())
