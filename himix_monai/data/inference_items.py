"""
Inputs of bundle inference: item lists from a datalist or a folder, with texts; unique output names.

- :py:func:`build_inference_items` turns a MONAI datalist split or a folder of images with a text sidecar
  (``texts.csv`` with ``Image,Description`` columns, the LViT/GuideDecoder sheet format, or ``texts.json``
  ``{"file name": "report"}``) into the item list of ``bundle/configs/inference.json``: one item
  ``{"image", "text"}`` per input, a CT volume (a DICOM series folder or a 3-D NIfTI file) included;
- :py:func:`is_volume` tells the inputs that take the volume route (``inference.json``'s ``volume`` section:
  ``LoadImaged`` -> ``SliceInferer`` -> ``Invertd`` -> ``SaveImaged``, one NIfTI mask per volume);
- :py:class:`OutputNames` gives every input its own output name, keeping relative paths.

Errors are :py:class:`InferenceInputError` (a :py:class:`~himix_monai.data.datalist.DatalistError`) and name
the datalist, sidecar (with its row) or image file concerned.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data.folder_layout import FolderLayoutBase

from himix_monai.errors import DatalistError
from himix_monai.data.datalist import read_datalist_split
from himix_monai.data.file_matching import DirectoryIndex, find_image_file
from himix_monai.data.sheets import read_description_sheet
from himix_monai.files import IMAGE_EXTENSIONS, PICTURE_EXTENSIONS, dicom_files, is_nifti, split_image_extension

__all__ = [
    "TEXT_SIDECARS",
    "PICTURE_EXTENSIONS",
    "InferenceInputError",
    "find_text_sidecar",
    "read_text_sidecar",
    "list_inference_inputs",
    "is_volume",
    "build_inference_items",
    "OutputNames",
]

logger = logging.getLogger(__name__)

TEXT_SIDECARS: tuple[str, ...] = ("texts.csv", "texts.json")
"""Names of the text sidecar files of an input folder, in order of preference."""


class InferenceInputError(DatalistError):
    """An inference input (datalist, folder, sidecar row or image) cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------------------------
# input discovery


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def find_text_sidecar(folder: str | os.PathLike) -> Path | None:
    """The text sidecar of an input folder (``texts.csv`` or ``texts.json``), or None.

    Args:
        folder: the input folder.

    Raises:
        InferenceInputError: when the folder holds both sidecars (ambiguous).
    """
    found = [Path(folder) / name for name in TEXT_SIDECARS if (Path(folder) / name).is_file()]
    if len(found) > 1:
        raise InferenceInputError(f"{folder}: holds both {found[0].name} and {found[1].name}; keep one text sidecar")
    return found[0] if found else None


def _check_csv_fields(path: Path) -> None:
    """Rows with more fields than the header (unquoted commas in a text) would shift the columns."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InferenceInputError(f"{path}: cannot read the CSV file: {err}") from err
    if not rows:
        return
    width = len(rows[0])
    for number, row in enumerate(rows[1:], start=2):
        if len(row) > width:
            raise InferenceInputError(
                f"row {number} of {path}: {len(row)} fields where the header has {width}; put texts that contain "
                'commas in double quotes ("...")'
            )


def read_text_sidecar(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """Read a text sidecar: ``texts.csv`` (``Image,Description`` columns) or ``texts.json`` (name -> text).

    Args:
        path: the sidecar file (``.csv``, ``.xlsx`` or ``.json``).

    Returns:
        ``(image name, text, row)`` per entry, in file order; ``row`` is the row a spreadsheet shows (header is
        row 1) for tables and the 1-based entry number for JSON. Empty texts are kept as ``""``.

    Raises:
        InferenceInputError: naming the file (and row or entry) when it cannot be read, lacks the columns, is
            not a JSON object of strings, or lists an image twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InferenceInputError(f"{path}: text sidecar not found")
    entries: list[tuple[str, str, int]] = []
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InferenceInputError(f"{path}: not valid JSON: {err}") from err
        if not isinstance(raw, Mapping):
            raise InferenceInputError(
                f"{path}: expected a JSON object {{\"image file name\": \"report\", ...}}, got {type(raw).__name__}"
            )
        for number, (name, text) in enumerate(raw.items(), start=1):
            if not isinstance(text, str):
                raise InferenceInputError(
                    f"entry {number} of {path} ({name!r}): the text must be a string, got {type(text).__name__}"
                )
            entries.append((str(name).strip(), text.strip(), number))
        unit = "entry"
    else:
        if path.suffix.lower() == ".csv":
            _check_csv_fields(path)
        try:
            rows = read_description_sheet(path)
        except DatalistError as err:
            raise InferenceInputError(str(err)) from err
        entries = [(row.image, row.description, row.row) for row in rows]
        unit = "row"
    seen: dict[str, int] = {}
    for name, _, row in entries:
        if not name:
            raise InferenceInputError(f"{unit} {row} of {path}: no image name")
        if name in seen:
            raise InferenceInputError(
                f"{unit} {row} of {path}: image {name!r} is listed again (first at {unit} {seen[name]})"
            )
        seen[name] = row
    return entries


def list_inference_inputs(folder: str | os.PathLike) -> list[Path]:
    """The inputs of a folder: image files (see ``IMAGE_EXTENSIONS``) and DICOM series sub-folders, sorted by name.

    Hidden files and the text sidecars are skipped; a sub-folder is an input when it holds DICOM files.

    Args:
        folder: the input folder.

    Raises:
        InferenceInputError: when the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InferenceInputError(f"{folder}: input folder not found")
    inputs = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if _is_hidden(path) or path.name in TEXT_SIDECARS:
            continue
        if path.is_dir():
            if dicom_files(path):
                inputs.append(path)
            else:
                logger.debug("%s: sub-folder without DICOM files, skipped", path)
        elif split_image_extension(path.name)[1].lower() in IMAGE_EXTENSIONS:
            inputs.append(path)
    return inputs


def is_volume(path: str | os.PathLike) -> bool:
    """Whether an input takes the volume route: a folder (a DICOM series) or a NIfTI file with a third spatial
    dimension of more than one voxel. Reads headers only; anything else is a 2-D image.

    Args:
        path: an input file or folder.

    Raises:
        InferenceInputError: naming the file, when a NIfTI header cannot be read or has more than 3 dimensions.
    """
    path = Path(path)
    if path.is_dir():
        return True
    if not is_nifti(path):
        return False
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as err:  # nibabel raises several types for corrupt files
        raise InferenceInputError(f"{path}: cannot read the NIfTI header: {err}") from err
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or shape[2] == 1:  # (H, W), (H, W, 1) or (H, W, 1, C): a 2-D image
        return False
    if len(shape) > 3:
        raise InferenceInputError(f"{path}: NIfTI image of shape {shape} is not a 2-D image or a 3-D volume")
    return True


# --------------------------------------------------------------------------------------------------------------
# item lists


def _check_default_text(default_text: str | None) -> str | None:
    if default_text is None:
        return None
    if not isinstance(default_text, str):
        raise TypeError(f"default_text must be a str or None, got {type(default_text).__name__}")
    return default_text.strip() or None


def _datalist_inputs(
    datalist: Path, split: str, default_text: str | None, base_dir: Path | None
) -> list[tuple[Path, str]]:
    raw = read_datalist_split(datalist, split, InferenceInputError)
    items = raw[split]
    if not isinstance(items, list):
        raise InferenceInputError(f"{datalist}: {split!r} is a {type(items).__name__}, expected a list of items")
    if not items:
        raise InferenceInputError(f"{datalist}: the split {split!r} has no items")
    base = base_dir if base_dir is not None else datalist.parent
    inputs = []
    for position, item in enumerate(items, start=1):
        where = f"item {position} of {split!r} in {datalist}"
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, Mapping) or not isinstance(item.get("image"), str) or not item["image"]:
            raise InferenceInputError(f"{where}: expected an object with a non-empty 'image' path, got {item!r}")
        image = Path(item["image"]).expanduser()
        image = image if image.is_absolute() else base / image
        if not image.exists():
            raise InferenceInputError(f"{where}: image {image} not found")
        text = item.get("text")
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            if default_text is None:
                raise InferenceInputError(
                    f"{where}: no text for image {image}; give the item a 'text' or set default_text"
                )
            text = default_text
        inputs.append((image, text))
    return inputs


def _folder_inputs(folder: Path, default_text: str | None) -> list[tuple[Path, str]]:
    inputs = list_inference_inputs(folder)
    if not inputs:
        raise InferenceInputError(
            f"{folder}: no images in the folder (looked for {', '.join(IMAGE_EXTENSIONS)} files and DICOM series "
            "sub-folders)"
        )
    sidecar = find_text_sidecar(folder)
    texts: dict[Path, str] = {}
    if sidecar is not None:
        unit = "entry" if sidecar.suffix.lower() == ".json" else "row"
        index = DirectoryIndex(folder)
        series = {path.name: path for path in inputs if path.is_dir()}
        for name, text, row in read_text_sidecar(sidecar):
            name = name.rstrip("/\\")
            match = series.get(name)
            if match is None:
                found = find_image_file(index, name)
                match = found.path if found is not None else None
            if match is None or match not in inputs:
                raise InferenceInputError(
                    f"{unit} {row} of {sidecar}: names {name!r}, which is not an image or DICOM series in {folder}"
                )
            if match in texts:
                raise InferenceInputError(f"{unit} {row} of {sidecar}: {name!r} is a second text for {match.name}")
            if not text and default_text is None:
                raise InferenceInputError(f"{unit} {row} of {sidecar}: empty text for {match.name}; write its report")
            texts[match] = text or default_text  # type: ignore[assignment]
    result = []
    for path in inputs:
        text = texts.get(path)
        if text is None:
            if default_text is None:
                where = f"no entry in {sidecar}" if sidecar else f"no {' or '.join(TEXT_SIDECARS)} in {folder}"
                raise InferenceInputError(
                    f"{path}: missing text for this image ({where}); add its report or set default_text"
                )
            text = default_text
        result.append((path, text))
    return result


def build_inference_items(
    input_datalist: str | os.PathLike | None = None,
    input_dir: str | os.PathLike | None = None,
    split: str = "test",
    default_text: str | None = None,
    base_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """
    The items of a bundle inference run, from a datalist split or from a folder with a text sidecar.

    Datalist: a MONAI datalist JSON file; the items of ``split`` need an ``image`` (relative paths are
    resolved against ``base_dir``, default the datalist's folder) and a ``text``; other keys (``label`` ...)
    are ignored. Folder: every image file (``.png``, ``.jpg``, ``.nii.gz``, ``.dcm``, ...) and every DICOM
    series sub-folder is an input; its text comes from ``texts.csv`` (``Image,Description`` columns, names
    matched exactly, by stem or without a ``mask_`` prefix) or ``texts.json`` (``{"name": "report"}``), where a
    DICOM series is named by its folder name.

    Every input gives one item ``{"image": path, "text": text}`` (absolute path), a CT volume included (see
    :py:func:`is_volume`).

    Args:
        input_datalist: a datalist JSON file (give this or ``input_dir``).
        input_dir: a folder of images with a text sidecar.
        split: the datalist split to read.
        default_text: text for inputs without one (no sidecar entry, no datalist ``text``); None makes a
            missing text an error.
        base_dir: the folder relative datalist paths are resolved against.

    Returns:
        The items, in datalist or file-name order.

    Raises:
        InferenceInputError: naming the file (and row) concerned: neither or both inputs given, a missing or
            invalid datalist or split, an image that does not exist, an image without text, a sidecar row
            naming an absent file, an empty folder.

    Examples::

        items = build_inference_items(input_dir="/data/new_cases")  # with /data/new_cases/texts.csv
        items = build_inference_items(input_datalist="datalist.json", split="test")
    """
    default_text = _check_default_text(default_text)
    given = [value for value in (input_datalist, input_dir) if value not in (None, "")]
    if len(given) != 1:
        raise InferenceInputError(
            "give exactly one of input_datalist (a datalist JSON file) and input_dir (a folder of images with "
            f"texts.csv or texts.json), got input_datalist={input_datalist!r}, input_dir={input_dir!r}"
        )
    if input_datalist not in (None, ""):
        inputs = _datalist_inputs(
            Path(input_datalist).expanduser(), split, default_text, Path(base_dir) if base_dir is not None else None
        )
    else:
        inputs = _folder_inputs(Path(input_dir).expanduser(), default_text)  # type: ignore[arg-type]

    return [{"image": str(path.resolve()), "text": text} for path, text in inputs]


# --------------------------------------------------------------------------------------------------------------
# output names


def _plain_stem(path: str | os.PathLike) -> str:
    """A file name without its image extension (``.nii.gz`` counted as one); a folder keeps its name."""
    name = Path(os.fspath(path).rstrip("/\\")).name
    stem, extension = split_image_extension(name)
    if extension.lower() in IMAGE_EXTENSIONS:
        return stem
    return os.path.splitext(name)[0] if Path(path).is_file() else name


class _NamedLayout(FolderLayoutBase):
    """A MONAI folder layout that names files by :py:meth:`OutputNames.stem` (for ``SaveImaged(folder_layout=)``)."""

    def __init__(self, names: OutputNames, output_dir: str | os.PathLike, postfix: str, extension: str) -> None:
        self.names, self.output_dir, self.postfix, self.extension = names, Path(output_dir), postfix, extension

    def filename(self, subject: str | os.PathLike = "subject", idx: Any = None, **kwargs: Any) -> str:
        return str(self.names.path(subject, self.output_dir, self.postfix, self.extension))


class OutputNames:
    """
    One output name per input, unique within a run, keeping the inputs' relative paths.

    Writing ``<stem>_mask.png`` for every input, as MONAI's default layout does, makes ``x.png`` and ``x.jpg``,
    or ``A/img.png`` and ``B/img.png``, overwrite each other's mask. Here an input is named by its file name
    without extension (a DICOM series by its folder name) when no other input of the run has that name;
    inputs that share a name (compared ignoring case, for case-insensitive file systems) keep their path
    relative to the folder they share (``A/img``, ``B/img``), and those in the same folder also their
    extension (``x_png``, ``x_jpg``).

    Args:
        inputs: the run's inputs: paths, or items with the path under ``key``.
        key: the item key of the path.

    Examples::

        names = OutputNames(["/in/A/img.png", "/in/B/img.png", "/in/x.png", "/in/x.jpg", "/in/y.png"])
        names.stem("/in/B/img.png")  # "B/img"
        names.stem("/in/x.jpg")  # "x_jpg"
        names.stem("/in/y.png")  # "y"
        saver = SaveImaged(keys="pred", folder_layout=names.layout("out", "mask", ".png"))  # out/B/img_mask.png
    """

    def __init__(self, inputs: Sequence[Any] = (), key: str = "image") -> None:
        paths: list[str] = []
        for entry in inputs:
            value = entry.get(key) if isinstance(entry, Mapping) else entry
            if isinstance(value, (str, os.PathLike)):
                real = os.path.realpath(value)
                if real not in paths:
                    paths.append(real)
        self.names: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for path in paths:
            groups.setdefault(_plain_stem(path).casefold(), []).append(path)
        named: dict[str, str] = {}
        for group in groups.values():
            if len(group) == 1:
                named[group[0]] = _plain_stem(group[0])
                continue
            root = os.path.commonpath([os.path.dirname(path) for path in group])
            relative = {
                path: Path(os.path.relpath(os.path.dirname(path), root), _plain_stem(path)).as_posix() for path in group
            }
            relative = {path: name[2:] if name.startswith("./") else name for path, name in relative.items()}
            counts: dict[str, int] = {}
            for name in relative.values():
                counts[name.casefold()] = counts.get(name.casefold(), 0) + 1
            for path, name in relative.items():
                extension = os.path.basename(path)[len(_plain_stem(path)) :].lstrip(".").replace(".", "_")
                named[path] = f"{name}_{extension}" if counts[name.casefold()] > 1 and extension else name
        taken: set[str] = set()
        for path in paths:
            unique, number = named[path], 2
            while unique.casefold() in taken:
                unique, number = f"{named[path]}_{number}", number + 1
            taken.add(unique.casefold())
            self.names[path] = unique

    def stem(self, path: str | os.PathLike) -> str:
        """The output name of ``path`` (without postfix and extension); an unknown path gets its file stem."""
        return self.names.get(os.path.realpath(path)) or _plain_stem(path)

    def path(
        self, source: str | os.PathLike, output_dir: str | os.PathLike, postfix: str = "", extension: str = ""
    ) -> Path:
        """``<output_dir>/<stem>[_<postfix>]<extension>`` for the input ``source`` (parent folders are created)."""
        suffix = f"_{postfix}" if postfix else ""
        out = Path(output_dir) / f"{self.stem(source)}{suffix}{extension}"
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def layout(self, output_dir: str | os.PathLike, postfix: str = "", extension: str = "") -> FolderLayoutBase:
        """A MONAI folder layout with these names, for ``SaveImaged(folder_layout=...)``.

        Args:
            output_dir: the output folder.
            postfix: appended to the name after ``_``.
            extension: the file extension, e.g. ``".png"``.
        """
        return _NamedLayout(self, output_dir, postfix, extension)
