"""
Image file checks: the spatial size of an image file as training loads it, and whether an image/mask pair can be
used (:py:func:`check_image_label_pair`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from monai.data import NibabelReader, PILReader, PydicomReader
from monai.transforms import LoadImage

from himix_monai.data.skip_report import SkipReason
from himix_monai.errors import NonFiniteImageError, UnreadableImageError
from himix_monai.files import DICOM_EXTENSIONS, is_nifti

__all__ = ["PairProblem", "read_spatial_size", "check_image_label_pair", "format_size", "check_in_threads"]

_PNG_END = b"IEND\xaeB`\x82"  # type and CRC of the IEND chunk that ends every complete PNG file


class PairProblem(NamedTuple):
    """Why an image/mask pair cannot be used.

    Args:
        reason: one of the :py:class:`SkipReason` values.
        detail: a free-text explanation naming the file.
    """

    reason: str
    detail: str


@functools.cache
def _loader() -> LoadImage:
    """Training's loader (the readers of ``image_readers`` in ``train.json``), made once: making one logs."""
    readers = [PydicomReader(), NibabelReader(), PILReader(reverse_indexing=False)]
    return LoadImage(reader=readers, image_only=True, ensure_channel_first=True, dtype=None)


def _header_size(path: Path) -> tuple[int, ...]:
    """The size from the header alone, in the layout of :py:func:`_loader` (DICOM: columns first)."""
    if is_nifti(path):
        import nibabel

        return tuple(nibabel.load(path).shape)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        import pydicom

        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(dataset.get("NumberOfFrames") or 1)
        return (int(dataset.Columns), int(dataset.Rows)) + ((frames,) if frames > 1 else ())
    from PIL import Image

    with Image.open(path) as image:
        return (image.height, image.width)


def _decoded_size(path: Path) -> tuple[int, ...]:
    """Load the file as training does; a PNG must end with its IEND chunk and pixel values must be finite."""
    from himix_monai.transforms.checks import non_finite_counts  # here: the transforms package imports data

    image = _loader()(path)
    if path.suffix.lower() == ".png":
        with open(path, "rb") as stream:  # a PNG cut inside its last chunk still decodes
            stream.seek(max(0, path.stat().st_size - len(_PNG_END)))
            if stream.read() != _PNG_END:
                raise UnreadableImageError(f"{path}: truncated PNG (no IEND chunk at the end of the file)")
    nans, infs = non_finite_counts(image)
    if nans or infs:
        raise NonFiniteImageError(f"{path}: {nans} NaN and {infs} infinite pixel values (of {image.numel()})")
    return tuple(image.shape[1:])


def read_spatial_size(path: str | os.PathLike, verify: bool = True) -> tuple[int, ...]:
    """Read the spatial size of an image file as training's readers lay it out, checking that it is readable.

    With ``verify`` the file is loaded with MONAI's ``LoadImage`` and the readers of ``train.json``
    (``PydicomReader``, ``NibabelReader``, ``PILReader(reverse_indexing=False)``), so what passes here loads in
    training: pictures give ``(H, W)`` whatever their channels (a 3-channel mask has the size of its grey
    image), NIfTI its stored shape, DICOM ``(columns, rows[, frames])``. Trailing singleton dimensions are dropped.

    Args:
        path: the image file.
        verify: decode the pixel data to detect truncated or corrupt files and NaN or infinite values; False
            reads the header only.

    Returns:
        The spatial size.

    Raises:
        UnreadableImageError: when the file cannot be read or decoded.
        NonFiniteImageError: with ``verify``, when the pixel data holds NaN or inf.
    """
    path = Path(path)
    try:
        shape = _decoded_size(path) if verify else _header_size(path)
    except (UnreadableImageError, NonFiniteImageError):
        raise
    except Exception as err:  # each reader raises its own types for corrupt input
        first_line = (str(err).splitlines() or [""])[0]  # LoadImage appends every reader's traceback
        raise UnreadableImageError(f"{path}: {type(err).__name__}: {first_line}") from err
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def format_size(size: tuple[int, ...]) -> str:
    """A spatial size as text: ``(512, 512)`` -> ``"512x512"``.

    Args:
        size: the size.
    """
    return "x".join(str(s) for s in size)


def check_image_label_pair(
    image: str | os.PathLike, label: str | os.PathLike, verify: bool = True, two_d: bool = False
) -> PairProblem | None:
    """Check that an image and its mask exist, are readable and have the same spatial size.

    Args:
        image: the image file.
        label: the mask file.
        verify: decode the files to detect truncated or corrupt ones and NaN or infinite values; False reads
            headers only.
        two_d: the image must be 2-D (a volume is a ``"3-D volume"`` problem).

    Returns:
        None if the pair is usable, else the problem.
    """
    sizes = []
    for path, what in ((Path(image), "IMAGE"), (Path(label), "MASK")):
        if not path.is_file():
            return PairProblem(getattr(SkipReason, f"MISSING_{what}"), f"{path} not found")
    for path, what in ((Path(image), "IMAGE"), (Path(label), "MASK")):
        try:
            sizes.append(read_spatial_size(path, verify))
        except UnreadableImageError as err:
            return PairProblem(getattr(SkipReason, f"UNREADABLE_{what}"), str(err))
        except NonFiniteImageError as err:
            return PairProblem(getattr(SkipReason, f"NON_FINITE_{what}"), str(err))
    if sizes[0] != sizes[1]:
        detail = f"image {image} is {format_size(sizes[0])}, mask {label} is {format_size(sizes[1])}"
        return PairProblem(SkipReason.SIZE_MISMATCH, detail)
    if two_d and len(sizes[0]) > 2:
        detail = f"{image} is a volume of size {format_size(sizes[0])}; a 2-D image is expected (slice volumes first)"
        return PairProblem("3-D volume", detail)
    return None


def check_in_threads(
    check: Callable[[Any], PairProblem | None], items: Iterable[Any], num_workers: int | None = None
) -> Iterator[PairProblem | None]:
    """``check(item)`` for every item, in order, run in ``num_workers`` threads (file checks wait on the disk).

    Closing the iterator early (a ``--strict`` converter stopping at the first bad item) cancels the checks not
    started yet.

    Args:
        check: e.g. ``lambda pair: check_image_label_pair(*pair)``.
        items: what to check.
        num_workers: threads; default ``min(8, cpu count)``; 1 checks in the calling thread.
    """
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers <= 1:
        yield from map(check, items)
        return
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datalist-check")
    try:
        yield from executor.map(check, items)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
