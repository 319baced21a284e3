"""Convert a dataset in the LViT layout (QaTa-COV19, MosMedData+, MoNuSeg) to a HiMix datalist.

Layout, as published with LViT::

    ROOT/
        Train_Folder/  img/*.png  labelcol/*.png  Train_text.xlsx
        Val_Folder/    img/       labelcol/       Val_text.xlsx
        Test_Folder/   img/       labelcol/       Test_text.xlsx

The text sheets (``.xlsx`` or ``.csv`` with ``text`` in the name, in ROOT or in a split folder) have the
columns ``Image`` and ``Description``; the split words in the name (``Train``, ``Val``, ``Test``) say which
folders a sheet covers. QaTa-COV19 ships a single ``Train_Val_text.xlsx`` for both the Train and the Val
folder; a split-specific sheet is preferred when both exist. Mask files are named like their image or
``mask_<image name>`` (QaTa). When a sheet names ``x.png`` but the folder holds ``x.tif`` (MoNuSeg's Test
folder), the file with the same stem is used and the mismatches are counted in one summary note.

Splits: ``Train_Folder`` -> training, ``Val_Folder`` -> validation, ``Test_Folder`` -> test. Missing
folders give empty splits; a ROOT with none of them is an error.

Usage::

    python -m data_prep.lvit --root DIR --out DATALIST.json [--strict]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep._cli import CandidateItem, ImageMaskFolder, Located, ProgressFn, build_datalist, build_parser
from data_prep._cli import find_split_children, image_mask_folder, note_unlisted_images, run_converter, sheet_candidates
from himix_monai.data.datalist import DATALIST_SPLITS
from himix_monai.data.file_matching import find_image_file
from himix_monai.data.sheets import read_description_sheet
from himix_monai.data.skip_report import SkipReport
from himix_monai.errors import DatalistError

__all__ = [
    "SPLIT_FOLDER_NAMES",
    "IMAGE_FOLDER",
    "MASK_FOLDER",
    "TextSheet",
    "find_split_folders",
    "sheet_splits",
    "find_text_sheets",
    "assign_sheets",
    "convert",
    "main",
]

SPLIT_FOLDER_NAMES: dict[str, str] = {"training": "Train_Folder", "validation": "Val_Folder", "test": "Test_Folder"}
"""The folder of each datalist split."""

IMAGE_FOLDER = "img"
MASK_FOLDER = "labelcol"

_SHEET_SPLIT_WORDS = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
    "testing": "test",
}
_SHEET_EXTENSIONS = (".xlsx", ".xls", ".csv")
_SHEET_TEXT_WORD = "text"


@dataclass(frozen=True)
class TextSheet:
    """A text sheet and the splits it covers (``Train_Val_text.xlsx`` covers training and validation).

    Args:
        path: the sheet.
        splits: the datalist splits it covers, in datalist order.
    """

    path: Path
    splits: tuple[str, ...]


def find_split_folders(root: Path) -> dict[str, ImageMaskFolder]:
    """Find ``Train_Folder``, ``Val_Folder`` and ``Test_Folder`` (any case) with their ``img``/``labelcol``.

    Args:
        root: the dataset root.

    Returns:
        The split folders found, keyed by datalist split.

    Raises:
        DatalistError: when none is found, or one lacks ``img`` or ``labelcol``.
    """
    folders = {
        split: image_mask_folder(folder, IMAGE_FOLDER, MASK_FOLDER)
        for split, folder in find_split_children(root, SPLIT_FOLDER_NAMES).items()
    }
    if not folders:
        expected = ", ".join(SPLIT_FOLDER_NAMES.values())
        raise DatalistError(f"{root}: none of the LViT split folders ({expected}) found")
    return folders


def sheet_splits(path: Path, folder_split: str | None = None) -> tuple[str, ...] | None:
    """The splits a text sheet covers, from its name: ``Train_text.xlsx`` -> training, ``Train_Val_text`` -> both.

    A text sheet is an ``.xlsx``/``.xls``/``.csv`` file with the word ``text`` in its name (words separated by
    ``_``, ``-`` or spaces). A sheet whose name has no split word covers the split of the folder it is in.

    Args:
        path: a file.
        folder_split: the split of the folder holding the file, None for the dataset root.

    Returns:
        The datalist splits in datalist order, or None if the file is not a text sheet.
    """
    if path.suffix.lower() not in _SHEET_EXTENSIONS:
        return None
    words = re.split(r"[_\-\s]+", path.stem.lower())
    if _SHEET_TEXT_WORD not in words:
        return None
    covered = {_SHEET_SPLIT_WORDS[word] for word in words if word in _SHEET_SPLIT_WORDS}
    if not covered and folder_split is not None:
        covered = {folder_split}
    return tuple(split for split in DATALIST_SPLITS if split in covered) or None


def find_text_sheets(root: Path, folders: dict[str, ImageMaskFolder]) -> list[TextSheet]:
    """Find the text sheets in ``root`` and in the split folders.

    Args:
        root: the dataset root.
        folders: the split folders.

    Returns:
        The sheets found, sorted by path.
    """
    sheets = []
    places = [(root, None), *((f.folder, split) for split, f in folders.items())]
    for folder, folder_split in places:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(("~$", ".")):
                splits = sheet_splits(path, folder_split)
                if splits:
                    sheets.append(TextSheet(path, splits))
    return sheets


def _sheet_preference(sheet: TextSheet, folder: ImageMaskFolder) -> tuple:
    """Sort key: split-specific sheets first, then sheets in the split folder, then xlsx before csv."""
    in_split_folder = sheet.path.parent == folder.folder
    extension_rank = _SHEET_EXTENSIONS.index(sheet.path.suffix.lower())
    return (len(sheet.splits), not in_split_folder, extension_rank, sheet.path.name)


def assign_sheets(
    sheets: Sequence[TextSheet], folders: dict[str, ImageMaskFolder], root: Path
) -> list[tuple[TextSheet, tuple[str, ...]]]:
    """Choose one sheet per split folder: the most specific one (``Train_text`` before ``Train_Val_text``).

    Args:
        sheets: the sheets found.
        folders: the split folders.
        root: the dataset root, for error messages.

    Returns:
        ``(sheet, splits it is used for)`` pairs, in datalist split order.

    Raises:
        DatalistError: when a split folder has no sheet.
    """
    used_for: dict[Path, list[str]] = {}
    by_path = {sheet.path: sheet for sheet in sheets}
    for split, folder in folders.items():
        candidates = sorted((s for s in sheets if split in s.splits), key=lambda s: _sheet_preference(s, folder))
        if not candidates:
            name = SPLIT_FOLDER_NAMES[split].split("_")[0]
            raise DatalistError(
                f"{folder.folder}: no text sheet found for it "
                f"(expected {name}_text.xlsx or .csv, or Train_Val_text.xlsx, in {folder.folder} or {root})"
            )
        used_for.setdefault(candidates[0].path, []).append(split)
    return [(by_path[path], tuple(splits)) for path, splits in used_for.items()]


def _image_locator(sheet: TextSheet, folders: dict[str, ImageMaskFolder]):
    """Find a row's image in the split folders the sheet covers; exact names before stem matches."""

    def locate(name: str) -> Located | str:
        matches = []
        for split in (s for s in sheet.splits if s in folders):
            match = find_image_file(folders[split].images, name)
            if match is not None:
                matches.append((split, match, folders[split].masks))
        exact = [m for m in matches if not m[1].by_stem]
        if exact or matches:
            return (exact or matches)[0]
        searched = ", ".join(str(folders[s].images.folder) for s in sheet.splits if s in folders)
        return f"no {name!r} in {searched}"

    return locate


def convert(args: argparse.Namespace, report: SkipReport, progress: ProgressFn) -> dict:
    """Convert the LViT dataset at ``args.root`` to a datalist.

    Args:
        args: parsed arguments.
        report: collects skipped items.
        progress: progress wrapper.

    Returns:
        The datalist.
    """
    root = args.root
    folders = find_split_folders(root)
    assignments = assign_sheets(find_text_sheets(root, folders), folders, root)
    candidates: list[CandidateItem] = []
    listed_images: set[Path] = set()
    for sheet, targets in assignments:
        rows = read_description_sheet(sheet.path)
        locate = _image_locator(sheet, folders)
        candidates.extend(sheet_candidates(sheet.path, rows, locate, report, listed_images, targets))
    note_unlisted_images((f.images for f in folders.values()), listed_images, report, "text sheet")
    return build_datalist(candidates, args, report, progress)


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.lvit --root DIR --out DATALIST.json [--strict]``; returns the exit code."""
    parser = build_parser("python -m data_prep.lvit", (__doc__ or "").splitlines()[0])
    return run_converter(parser.parse_args(argv), convert)


if __name__ == "__main__":
    raise SystemExit(main())
