"""
Files: the one atomic-write helper of the package, and MONAI image writers that use it.

Every file the package writes (datalists, report sheets, checkpoints, NIfTI and PNG masks) goes through
:py:func:`atomic_path`: the data is written to a temporary file in the target's folder, flushed to disk, given
the permissions a plain ``open(path, "w")`` would give, then moved over the target with :py:func:`os.replace`.
Readers see the old file or the complete new one, never half of one; and a target that is a symbolic link is
replaced by the new file, never written through (``os.replace`` renames over the link itself), so a link left in
an output folder cannot make a run overwrite a file elsewhere.

This module imports only :py:mod:`himix_monai.errors` from the package: every layer may use it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from monai.data import NibabelWriter, PILWriter

from himix_monai.errors import OutOfSpaceError

__all__ = [
    "PICTURE_EXTENSIONS",
    "NIFTI_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "split_image_extension",
    "is_nifti",
    "dicom_files",
    "full_suffix",
    "file_stem",
    "atomic_path",
    "is_out_of_space",
    "out_of_space_error",
    "write_new_file",
    "write_text_atomically",
    "fsync_directory",
    "AtomicPILWriter",
    "AtomicNibabelWriter",
]

PICTURE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")
"""Extensions of picture files, read with PIL (MONAI's ``PILReader``)."""

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")
"""Extensions of NIfTI files (the two-part one first)."""

DICOM_EXTENSIONS: tuple[str, ...] = (".dcm",)

IMAGE_EXTENSIONS: tuple[str, ...] = PICTURE_EXTENSIONS + NIFTI_EXTENSIONS + DICOM_EXTENSIONS
"""Every extension read as an image (the one list of the package), in order of preference when a stem matches
several files."""


def split_image_extension(name: str) -> tuple[str, str]:
    """Split a file name into stem and extension, keeping compound image extensions such as ``.nii.gz``.

    Args:
        name: a file name.

    Returns:
        ``(stem, extension)``; the extension keeps its case and may be ``""``.
    """
    lower = name.lower()
    for extension in IMAGE_EXTENSIONS:
        if lower.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)], name[-len(extension) :]
    return os.path.splitext(name)


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case).

    Args:
        path: a file name or path.
    """
    return os.fspath(path).lower().endswith(NIFTI_EXTENSIONS)


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a series folder, sorted by name: ``*.dcm`` files and files with the DICOM preamble.

    Hidden files, sub-folders and ``DICOMDIR`` are left out; a ``.dcm`` file is listed without being read.

    Args:
        folder: the series folder.
    """
    import pydicom

    files = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        if path.suffix.lower() in DICOM_EXTENSIONS or pydicom.misc.is_dicom(str(path)):
            files.append(path)
    return files


def file_stem(filename: str | os.PathLike) -> str:
    """The base name of a file without its extension, ``.nii.gz`` and ``.dcm.gz`` counted as one
    (``"/data/case_7.nii.gz"`` -> ``"case_7"``): the name the overlay and word-map writers give their outputs.

    Args:
        filename: a file name or path.
    """
    name = os.path.basename(str(filename))
    for ext in (".nii.gz", ".dcm.gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def full_suffix(name: str | os.PathLike) -> str:
    """The extension of a file name, ``.nii.gz`` counted as one (``"a.nii.gz"`` -> ``".nii.gz"``).

    Args:
        name: a file name or path.
    """
    name = os.fspath(name)
    if name.lower().endswith(".nii.gz"):
        return name[-7:]
    return os.path.splitext(name)[1]


def _file_mode() -> int:
    """``0o666`` minus the process umask: the mode a plain ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_directory(folder: str | os.PathLike) -> None:
    """Persist a rename in ``folder``; not supported on every platform, so failures are ignored.

    Args:
        folder: the folder that holds the renamed file.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 1 << 20  # below this free space, a failed write is put down to the full disk


def _format_bytes(count: float) -> str:
    """``count`` bytes in the largest unit that keeps the number at least 1 (``"3.2 GB"``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def is_out_of_space(error: BaseException, folder: str | os.PathLike) -> bool:
    """Whether ``error``, raised while writing into ``folder``, comes from a full disk or quota.

    True when an error in its ``__cause__``/``__context__`` chain has errno ``ENOSPC`` or ``EDQUOT``, or when
    ``folder``'s disk has less than 1 MB left: ``torch.save`` to a file name reports a full disk as a
    ``RuntimeError`` of its C++ writer, without an errno.

    Args:
        error: the exception raised by the write.
        folder: the folder written to.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def out_of_space_error(path: str | os.PathLike, outcome: str) -> OutOfSpaceError:
    """The error for a write of ``path`` that failed on a full disk: it names the file, the space left on its disk
    and what to do. Call it before removing a partly written file, so that the free space is the space left.

    Args:
        path: the file that could not be written.
        outcome: what became of it, one or more sentences (``"Nothing was replaced: ..."``).
    """
    path = Path(path)
    try:
        usage = shutil.disk_usage(path.parent)
        space = f" ({_format_bytes(usage.free)} free of {_format_bytes(usage.total)})"
    except OSError:
        space = ""
    error = OutOfSpaceError(
        f"Could not write {path}: the disk that holds {path.parent} is full{space}. {outcome} Free space on that "
        "disk, or write to another folder (--bundle_root, --output_dir), then run the command again (a training "
        "continues from its last saved state with --resume true)."
    )
    error.errno = errno.ENOSPC
    return error


def _nothing_replaced(path: Path) -> str:
    kept = f"the earlier {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    return f"Nothing was replaced: {kept} and the partly written temporary file was removed."


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", replace: bool = True) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; moved over ``path`` when the block ends without error.

    The temporary file is in ``path``'s folder (created when missing) and is named ``.<name>.<random><suffix>``:
    ``.tmp`` by default, which :py:func:`himix_monai.run_guard.remove_stale_temp_files` finds after a crash;
    writers that choose the format by extension pass the target's (:py:func:`full_suffix`). It is removed when
    the block raises; a failure that comes from a full disk (:py:func:`is_out_of_space`) is raised as
    :py:class:`~himix_monai.errors.OutOfSpaceError`, which names the file and says what to do (the original error
    is its ``__cause__``). On success it is fsynced, given the usual file permissions, and renamed over ``path``;
    when ``path`` is a symbolic link, the link is replaced and its target is left untouched. With
    ``replace=False`` it is hard-linked to ``path`` instead, which raises ``FileExistsError`` (and writes nothing)
    when ``path`` exists, also as a link: :py:func:`write_new_file` uses it.

    Args:
        path: the file to write.
        suffix: the end of the temporary file's name.
        replace: replace an existing ``path`` (default), or refuse to.

    Examples::

        with atomic_path("out/mask.nii.gz", suffix=".nii.gz") as temp:
            nib.save(image, temp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp: Path | None = None
    try:
        descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(descriptor)
        temp = Path(temp_name)
        yield temp
        with open(temp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temp, _file_mode())
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)
            temp.unlink()
    except BaseException as error:
        full_disk = None
        if isinstance(error, Exception) and not isinstance(error, OutOfSpaceError):
            if is_out_of_space(error, path.parent):
                full_disk = out_of_space_error(path, _nothing_replaced(path))
        if temp is not None:
            temp.unlink(missing_ok=True)
        if full_disk is not None:
            raise full_disk from error
        raise
    fsync_directory(path.parent)


def write_new_file(path: str | os.PathLike, write: Callable[[BinaryIO], Any], attempts: int = 10000) -> Path:
    """Write a new file atomically, never replacing one: ``path``, else ``<stem>_1<ext>``, ``<stem>_2<ext>`` ...

    Each name is written with :py:func:`atomic_path` (``replace=False``), so a name taken by another process
    between the check and the write is skipped, never replaced.

    Args:
        path: the preferred file name.
        write: fills the open binary file it is given, e.g. ``lambda f: np.savez_compressed(f, **arrays)``.
        attempts: how many names to try.

    Returns:
        The path written.

    Examples::

        png = write_new_file(Path("maps/case_1_words.png"), lambda f: Image.fromarray(rgb).save(f, format="PNG"))
    """
    path = Path(path)
    stem, extension = split_image_extension(path.name)
    for attempt in range(attempts):
        candidate = path if attempt == 0 else path.with_name(f"{stem}_{attempt}{extension}")
        if candidate.exists() or candidate.is_symlink():
            continue
        try:
            with atomic_path(candidate, replace=False) as temp, open(temp, "wb") as stream:
                write(stream)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"No free file name for {path} (tried {attempts}): move the earlier files away.")


def write_text_atomically(path: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :py:func:`atomic_path`.

    Args:
        path: the file to write.
        text: its content.
        newline: passed to :py:func:`open` (``""`` keeps ``\\r\\n`` written by :py:mod:`csv`).

    Returns:
        ``path`` as a :py:class:`~pathlib.Path`.
    """
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8", newline=newline) as stream:
            stream.write(text)
    return Path(path)


class AtomicPILWriter(PILWriter):
    """MONAI's ``PILWriter`` writing through :py:func:`atomic_path`.

    MONAI's writers open the output path directly: a crash leaves half a file and a symbolic link in the output
    folder is written through. Give this class as ``SaveImaged(writer=...)``.
    """

    def write(self, filename: str | os.PathLike, verbose: bool = False, **kwargs) -> None:
        """Write the data to ``filename`` atomically; arguments as ``PILWriter.write``."""
        with atomic_path(filename, suffix=full_suffix(filename)) as temp:
            super().write(str(temp), verbose=verbose, **kwargs)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through :py:func:`atomic_path` (reason as :py:class:`AtomicPILWriter`)."""

    def write(self, filename: str | os.PathLike, verbose: bool = False, **obj_kwargs) -> None:
        """Write the data to ``filename`` atomically; arguments as ``NibabelWriter.write``."""
        with atomic_path(filename, suffix=full_suffix(filename)) as temp:
            super().write(str(temp), verbose=verbose, **obj_kwargs)
