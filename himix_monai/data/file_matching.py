"""
File-name matching: the files on disk that the names written in annotation sheets mean.

:py:class:`DirectoryIndex`, :py:func:`find_image_file` and :py:func:`find_mask_file` resolve names with a wrong or
missing extension (by stem, in the order of :py:data:`~himix_monai.files.IMAGE_EXTENSIONS`) and QaTa-COV19's
``mask_`` prefixes.
"""

from __future__ import annotations

import os
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


class DirectoryIndex:
    """The files of one folder, listed once, for fast name lookups with extension-mismatch resolution.

    Args:
        folder: the folder to list; a missing folder gives an empty index.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        names = [entry.name for entry in os.scandir(self.folder) if entry.is_file()] if self.folder.is_dir() else []
        self.names: frozenset[str] = frozenset(names)
        self._by_stem: dict[str, str] = {}  # stem -> the image file of the most preferred extension
        images = sorted(self.image_names(), key=lambda n: IMAGE_EXTENSIONS.index(split_image_extension(n)[1].lower()))
        for name in images:
            self._by_stem.setdefault(split_image_extension(name)[0], name)

    def image_names(self) -> list[str]:
        """The names of the image files in the folder, sorted."""
        return sorted(name for name in self.names if split_image_extension(name)[1].lower() in IMAGE_EXTENSIONS)

    def find(self, *names: str) -> FileMatch | None:
        """Find the file for the first of ``names`` present: exact names first, then image files with their stem.

        Args:
            names: file names to try in order; the first is the name as written in the annotation file.

        Returns:
            The match (``requested`` is ``names[0]``), or None if no name nor stem is in the folder.
        """
        exact = next((name for name in names if name in self.names), None)
        if exact is not None:
            return FileMatch(self.folder / exact, names[0], by_stem=False)
        stems = (split_image_extension(name)[0] for name in names)
        found = next((self._by_stem[stem] for stem in stems if stem in self._by_stem), None)
        return None if found is None else FileMatch(self.folder / found, names[0], by_stem=True)


def find_image_file(index: DirectoryIndex, name: str) -> FileMatch | None:
    """Find the image listed as ``name``: as written, else without a leading ``mask_`` prefix.

    GuideDecoder's QaTa-COV19 csv files list images by their mask name (``mask_covid_1.png``) while the
    image file is ``covid_1.png``.

    Args:
        index: the image folder.
        name: the image name as written in the annotation file.
    """
    return index.find(name, *([name[len(MASK_PREFIX) :]] if name.startswith(MASK_PREFIX) else []))


def mask_name_candidates(name: str, image_name: str) -> list[str]:
    """The mask file names to try for an item, in order: as written, the image name, ``mask_`` + image name.

    Args:
        name: the item's name as written in the annotation file.
        image_name: the name of the image file found for the item.
    """
    return list(dict.fromkeys(n for n in (name, image_name, MASK_PREFIX + image_name, MASK_PREFIX + name) if n))


def find_mask_file(index: DirectoryIndex, name: str, image_name: str) -> FileMatch | None:
    """Find the mask for an item, trying :py:func:`mask_name_candidates` exactly, then by stem.

    Args:
        index: the mask folder.
        name: the item's name as written in the annotation file.
        image_name: the name of the image file found for the item.
    """
    return index.find(*mask_name_candidates(name, image_name))
