"""
File-name matching: the files on disk that the names written in annotation sheets mean.

:py:class:`DirectoryIndex`, :py:func:`find_image_file` and :py:func:`find_mask_file` resolve names with a wrong or
missing extension (by stem, in the order of :py:data:`~himix_monai.files.IMAGE_EXTENSIONS`) and QaTa-COV19's
``mask_`` prefixes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from himix_monai.files import IMAGE_EXTENSIONS, split_image_extension

__all__ = ["MASK_PREFIX", "FileMatch", "DirectoryIndex", "find_image_file", "mask_name_candidates", "find_mask_file"]

MASK_PREFIX = "mask_"
"""Prefix of QaTa-COV19 mask file names (``mask_<image name>``)."""


class FileMatch(NamedTuple):
    """A file found for a name written in an annotation file.

    Args:
        path: the file found.
        requested: the name as written in the annotation file.
        by_stem: True when the file was found by its stem because the extension differed.
    """

    path: Path
    requested: str
    by_stem: bool


def _is_image_name(name: str) -> bool:
    return split_image_extension(name)[1].lower() in IMAGE_EXTENSIONS


class DirectoryIndex:
    """The files of one folder, listed once, for fast name lookups with extension-mismatch resolution.

    Args:
        folder: the folder to list; a missing folder gives an empty index.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.exists = self.folder.is_dir()
        names = sorted(entry.name for entry in os.scandir(self.folder) if entry.is_file()) if self.exists else []
        self.names: frozenset[str] = frozenset(names)
        self._names_by_stem: dict[str, list[str]] = {}
        for name in names:
            stem, extension = split_image_extension(name)
            if extension.lower() in IMAGE_EXTENSIONS:
                self._names_by_stem.setdefault(stem, []).append(name)
        for candidates in self._names_by_stem.values():
            candidates.sort(key=lambda n: IMAGE_EXTENSIONS.index(split_image_extension(n)[1].lower()))

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def image_names(self) -> list[str]:
        """The names of the image files in the folder, sorted."""
        return sorted(name for name in self.names if _is_image_name(name))

    def find(self, name: str) -> FileMatch | None:
        """Find the file for ``name``: the exact name, else an image file with the same stem.

        Args:
            name: a file name as written in an annotation file.

        Returns:
            The match, or None if neither the name nor its stem is in the folder.
        """
        if name in self.names:
            return FileMatch(self.folder / name, name, by_stem=False)
        candidates = self._names_by_stem.get(split_image_extension(name)[0], [])
        if candidates:
            return FileMatch(self.folder / candidates[0], name, by_stem=True)
        return None


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name for name in names if name))


def find_image_file(index: DirectoryIndex, name: str) -> FileMatch | None:
    """Find the image listed as ``name``: as written, else without a leading ``mask_`` prefix.

    GuideDecoder's QaTa-COV19 csv files list images by their mask name (``mask_covid_1.png``) while the
    image file is ``covid_1.png``.

    Args:
        index: the image folder.
        name: the image name as written in the annotation file.

    Returns:
        The match (its ``requested`` is ``name``), or None.
    """
    candidates = [name]
    if name.startswith(MASK_PREFIX):
        candidates.append(name[len(MASK_PREFIX) :])
    return _first_match(index, name, candidates)


def _first_match(index: DirectoryIndex, name: str, candidates: list[str]) -> FileMatch | None:
    """The first candidate file name found in ``index``: exact names first, then by stem."""
    for candidate in candidates:
        if candidate in index:
            return FileMatch(index.folder / candidate, name, by_stem=False)
    for candidate in candidates:
        match = index.find(candidate)
        if match is not None:
            return FileMatch(match.path, name, match.by_stem)
    return None


def mask_name_candidates(name: str, image_name: str) -> list[str]:
    """The mask file names to try for an item, in order: as written, the image name, ``mask_`` + image name.

    Args:
        name: the item's name as written in the annotation file.
        image_name: the name of the image file found for the item.
    """
    return _unique([name, image_name, MASK_PREFIX + image_name, MASK_PREFIX + name])


def find_mask_file(index: DirectoryIndex, name: str, image_name: str) -> FileMatch | None:
    """Find the mask for an item, trying :py:func:`mask_name_candidates` exactly, then by stem.

    Args:
        index: the mask folder.
        name: the item's name as written in the annotation file.
        image_name: the name of the image file found for the item.

    Returns:
        The match (its ``requested`` is ``name``), or None.
    """
    candidates = mask_name_candidates(name, image_name)
    return _first_match(index, name, candidates)
