"""Convert a dataset in the medvlsm layout (Kvasir-SEG and the other medvlsm sets) to a HiMix datalist.

Layout::

    ROOT/
        anns/train.json  val.json  test.json
        images/          masks/

Each annotation file is a list of entries with ``img_name``, ``mask_name`` and ``prompts``: ``p0`` ... ``p9``,
where ``p0`` .. ``p6`` are strings (``p0`` may be empty) and ``p7`` .. ``p9`` lists of variants. The text of an
item is ``prompts[--prompt]``, and for list prompts its ``--variant``-th element; the default ``p9`` variant 0
is the style of the HiMix paper. ``--variant random`` picks one variant per item (seeded by ``--seed``).
Missing annotation files give empty splits.

Usage::

    python -m data_prep.medvlsm --root DIR --out DATALIST.json [--strict] [--prompt p9] [--variant 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep._cli import CandidateItem, ProgressFn, build_datalist, build_parser, image_mask_folder
from data_prep._cli import find_split_children, note_extension_mismatch, note_unlisted_images, required_folder
from data_prep._cli import run_converter
from himix_monai.data.file_matching import DirectoryIndex, find_image_file
from himix_monai.data.skip_report import SkipReason, SkipReport
from himix_monai.errors import DatalistError

__all__ = [
    "ANNOTATION_FOLDER",
    "ANNOTATION_FILES",
    "IMAGE_FOLDER",
    "MASK_FOLDER",
    "DEFAULT_PROMPT",
    "DEFAULT_VARIANT",
    "PromptChoice",
    "read_annotations",
    "select_prompt",
    "annotation_candidates",
    "convert",
    "build_argument_parser",
    "main",
]

ANNOTATION_FOLDER = "anns"
ANNOTATION_FILES: dict[str, str] = {"training": "train.json", "validation": "val.json", "test": "test.json"}
"""The annotation file of each datalist split."""

IMAGE_FOLDER = "images"
MASK_FOLDER = "masks"
DEFAULT_PROMPT = "p9"
DEFAULT_VARIANT = 0


@dataclass(frozen=True)
class PromptChoice:
    """Which prompt of an entry becomes the item's text.

    Args:
        key: the prompt key, e.g. ``"p9"``.
        variant: for list prompts, the index of the variant, or None to draw one with ``rng``.
        rng: the random generator for ``variant=None``.
    """

    key: str
    variant: int | None
    rng: random.Random


def read_annotations(path: Path) -> list[Any]:
    """Read a medvlsm annotation file: a JSON list of entries.

    Args:
        path: the annotation file.

    Raises:
        DatalistError: when the file is not valid JSON or not a list.
    """
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatalistError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DatalistError(f"{path}: cannot read: {err}") from err
    if not isinstance(entries, list):
        raise DatalistError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


def select_prompt(prompts: Any, choice: PromptChoice) -> tuple[str | None, str]:
    """The text chosen from an entry's ``prompts``.

    Args:
        prompts: the entry's ``prompts`` object.
        choice: which prompt and variant.

    Returns:
        ``(text, "")`` when found (the text may be empty), else ``(None, why)``.
    """
    if not isinstance(prompts, dict):
        return None, f"'prompts' is a {type(prompts).__name__}, expected an object"
    if choice.key not in prompts:
        return None, f"no prompt {choice.key!r} (has {', '.join(map(repr, prompts)) or 'none'})"
    value = prompts[choice.key]
    if isinstance(value, str):
        return value.strip(), ""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None, f"prompt {choice.key!r} is neither a string nor a list of strings"
    if not value:
        return "", ""
    if choice.variant is None:
        return choice.rng.choice(value).strip(), ""
    if choice.variant >= len(value):
        return None, f"prompt {choice.key!r} has {len(value)} variant(s), --variant {choice.variant} asked"
    return value[choice.variant].strip(), ""


def _entry_names(entry: Any) -> tuple[str, str] | str:
    """``(img_name, mask_name)``, or why the entry is malformed."""
    if not isinstance(entry, dict):
        return f"the entry is a {type(entry).__name__}, expected an object"
    names = []
    for key in ("img_name", "mask_name"):
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"no {key!r}"
        names.append(value.strip())
    return names[0], names[1]


def annotation_candidates(
    path: Path,
    split: str,
    images: DirectoryIndex,
    masks: DirectoryIndex,
    choice: PromptChoice,
    report: SkipReport,
    listed_images: set[Path],
) -> list[CandidateItem]:
    """The candidate items of one annotation file; bad entries are reported to ``report`` as ``entry N of FILE``.

    Args:
        path: the annotation file.
        split: its datalist split.
        images: listing of the image folder.
        masks: listing of the mask folder.
        choice: which prompt becomes the text.
        report: collects skipped entries.
        listed_images: updated with every image file an entry refers to.

    Returns:
        The candidates, in file order.
    """
    candidates = []
    first_entry_by_name: dict[str, int] = {}
    for number, entry in enumerate(read_annotations(path), start=1):
        names = _entry_names(entry)
        if isinstance(names, str):
            report.skip(f"entry {number}", SkipReason.MALFORMED_ENTRY, path, number, names, unit="entry")
            continue
        image_name, mask_name = names
        if image_name in first_entry_by_name:
            detail = f"already listed in entry {first_entry_by_name[image_name]}; keeping the first"
            report.skip(image_name, SkipReason.DUPLICATE_ID, path, number, detail, unit="entry")
            continue
        first_entry_by_name[image_name] = number
        image = find_image_file(images, image_name)
        if image is not None:
            listed_images.add(image.path)
        text, why = select_prompt(entry.get("prompts"), choice)
        if text is None:
            report.skip(image_name, SkipReason.MISSING_PROMPT, path, number, why, unit="entry")
            continue
        if not text:
            detail = f"prompt {choice.key!r} is empty"
            report.skip(image_name, SkipReason.EMPTY_DESCRIPTION, path, number, detail, unit="entry")
            continue
        if image is None:
            detail = f"no {image_name!r} in {images.folder}"
            report.skip(image_name, SkipReason.MISSING_IMAGE, path, number, detail, unit="entry")
            continue
        note_extension_mismatch(report, image, "annotation")
        mask = masks.find(mask_name)
        if mask is None:
            detail = f"no {mask_name!r} in {masks.folder}"
            report.skip(image_name, SkipReason.MISSING_MASK, path, number, detail, unit="entry")
            continue
        note_extension_mismatch(report, mask, "annotation")
        candidates.append(CandidateItem(split, image_name, image.path, mask.path, text, path, number, unit="entry"))
    return candidates


def convert(args: argparse.Namespace, report: SkipReport, progress: ProgressFn) -> dict:
    """Convert the medvlsm dataset at ``args.root`` to a datalist.

    Args:
        args: parsed arguments (``root``, ``prompt``, ``variant``, ``seed`` ...).
        report: collects skipped items.
        progress: progress wrapper.

    Returns:
        The datalist.
    """
    root = args.root
    annotation_folder = required_folder(root, ANNOTATION_FOLDER)
    annotation_files = find_split_children(annotation_folder, ANNOTATION_FILES, want_dir=False)
    if not annotation_files:
        raise DatalistError(f"{annotation_folder}: none of {', '.join(ANNOTATION_FILES.values())} found")
    for split, name in ANNOTATION_FILES.items():
        if split not in annotation_files:
            report.add_note(f"no {name}", f"no {annotation_folder / name}: the {split} split is empty")
    folder = image_mask_folder(root, IMAGE_FOLDER, MASK_FOLDER)
    images, masks = folder.images, folder.masks
    choice = PromptChoice(args.prompt, args.variant, random.Random(args.seed))
    candidates: list[CandidateItem] = []
    listed_images: set[Path] = set()
    for split, path in annotation_files.items():
        candidates.extend(annotation_candidates(path, split, images, masks, choice, report, listed_images))
    note_unlisted_images([images], listed_images, report, "annotation file")
    return build_datalist(candidates, args, report, progress)


def _prompt_key(text: str) -> str:
    if not re.fullmatch(r"p\d+", text):
        raise argparse.ArgumentTypeError(f"expected a prompt key like p0 ... p9, got {text!r}")
    return text


def _variant(text: str) -> int | None:
    if text == "random":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a variant index >= 0 or 'random', got {text!r}")
    return int(text)


def build_argument_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m data_prep.medvlsm``."""
    parser = build_parser("python -m data_prep.medvlsm", (__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--prompt", type=_prompt_key, default=DEFAULT_PROMPT, help="prompt key used as the text (p0 ... p9)"
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        default=DEFAULT_VARIANT,
        help="for list prompts (p7 ... p9), the variant index, or 'random' for one per item drawn with --seed",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.medvlsm --root DIR --out DATALIST.json [--prompt p9]``; returns the exit code."""
    return run_converter(build_argument_parser().parse_args(argv), convert)


if __name__ == "__main__":
    raise SystemExit(main())
