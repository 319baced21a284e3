"""
Image file checks: the spatial size of an image file, decoding it to find truncated or corrupt files and NaN
or infinite pixels, and whether an image/mask pair can be used (:py:func:`check_image_label_pair`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from himix_monai.data.skip_report import SkipReason
from himix_monai.errors import NonFiniteImageError, UnreadableImageError
from himix_monai.files import JPEG_EXTENSIONS, NIFTI_EXTENSIONS, TIFF_EXTENSIONS, split_image_extension

__all__ = ["UnreadableImageError", "PairProblem", "read_spatial_size", "check_image_label_pair", "format_size"]

_PNG_END = b"IEND\xaeB`\x82"  # type and CRC of the IEND chunk that ends every complete PNG file


class PairProblem(NamedTuple):
    """Why an image/mask pair cannot be used.

    Args:
        reason: one of the :py:class:`SkipReason` values.
        detail: a free-text explanation naming the file.
    """

    reason: str
    detail: str


def _pil_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        if verify:
            if path.suffix.lower() in JPEG_EXTENSIONS:
                # decode at reduced scale: still reads the whole entropy-coded stream, so truncation is detected
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
            if image.format == "PNG":
                _check_png_end(path)
            if image.mode.startswith("F"):  # 32-bit float TIFF: the only PIL mode that holds NaN or inf
                import numpy as np

                _check_finite(path, np.asarray(image))
    return (height, width)


def _check_png_end(path: Path) -> None:
    """A PNG cut inside its last chunk still decodes; a complete file ends with the IEND chunk."""
    with open(path, "rb") as stream:
        stream.seek(max(0, path.stat().st_size - len(_PNG_END)))
        if stream.read() != _PNG_END:
            raise UnreadableImageError(f"{path}: truncated PNG (no IEND chunk at the end of the file)")


def _check_finite(path: Path, pixels: Any) -> None:
    """Raise :py:class:`~himix_monai.errors.NonFiniteImageError` when float pixel data holds NaN or inf."""
    import numpy as np

    pixels = np.asarray(pixels)
    if pixels.dtype.kind not in "fc":
        return
    nans, infs = int(np.isnan(pixels).sum()), int(np.isinf(pixels).sum())
    if nans or infs:
        raise NonFiniteImageError(f"{path}: {nans} NaN and {infs} infinite pixel values (of {pixels.size})")


def _tifffile_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        shape = tuple(page.shape)
        if verify:
            _check_finite(path, page.asarray())
    # (H, W) or (H, W, samples)
    return shape[:2]


def _nifti_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    import nibabel
    import numpy as np

    image = nibabel.load(str(path))
    shape = tuple(int(s) for s in image.shape)
    if verify:
        _check_finite(path, np.asanyarray(image.dataobj))
    return shape[:3]


def _dicom_spatial_size(path: Path, verify: bool) -> tuple[int, ...]:
    import pydicom

    dataset = pydicom.dcmread(str(path), stop_before_pixels=not verify)
    if "Rows" not in dataset or "Columns" not in dataset:
        raise UnreadableImageError(f"{path}: DICOM file has no Rows/Columns (not an image?)")
    if verify:
        _check_finite(path, dataset.pixel_array)  # decodes the pixel data, raises on truncated or corrupt data
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    size = (int(dataset.Rows), int(dataset.Columns))
    return size if frames == 1 else (frames, *size)


def _drop_trailing_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_spatial_size(path: str | os.PathLike, verify: bool = True) -> tuple[int, ...]:
    """Read the spatial size of an image file, checking that it is readable.

    2D formats (png, jpg, tif, bmp) give ``(H, W)`` whatever the number of channels, so a 3-channel mask
    has the same size as its 1-channel image. NIfTI gives its (up to 3) spatial dimensions, DICOM
    ``(rows, columns)`` or ``(frames, rows, columns)``; trailing singleton dimensions are dropped.

    Args:
        path: the image file.
        verify: decode the pixel data to detect truncated or corrupt files and NaN or infinite values; False
            reads the header only.

    Returns:
        The spatial size.

    Raises:
        UnreadableImageError: when the file cannot be read or decoded.
        NonFiniteImageError: with ``verify``, when float pixel data (float TIFF, NIfTI, DICOM) holds NaN or inf.
    """
    path = Path(path)
    extension = split_image_extension(path.name)[1].lower()
    try:
        if extension in NIFTI_EXTENSIONS:
            shape = _nifti_spatial_size(path, verify)
        elif extension == ".dcm":
            shape = _dicom_spatial_size(path, verify)
        else:
            try:
                shape = _pil_spatial_size(path, verify)
            except Exception:
                if extension not in TIFF_EXTENSIONS:
                    raise
                shape = _tifffile_spatial_size(path, verify)  # TIFF flavours PIL cannot decode
    except (UnreadableImageError, NonFiniteImageError):
        raise
    except Exception as err:  # each reader raises its own types for corrupt input
        raise UnreadableImageError(f"{path}: {type(err).__name__}: {err}") from err
    return _drop_trailing_singletons(shape)


def format_size(size: tuple[int, ...]) -> str:
    """A spatial size as text: ``(512, 512)`` -> ``"512x512"``.

    Args:
        size: the size.
    """
    return "x".join(str(s) for s in size)


def check_image_label_pair(
    image: str | os.PathLike, label: str | os.PathLike, verify: bool = True
) -> PairProblem | None:
    """Check that an image and its mask exist, are readable and have the same spatial size.

    Args:
        image: the image file.
        label: the mask file.
        verify: decode the files to detect truncated or corrupt ones and NaN or infinite values; False reads
            headers only.

    Returns:
        None if the pair is usable, else the problem.
    """
    image, label = Path(image), Path(label)
    if not image.is_file():
        return PairProblem(SkipReason.MISSING_IMAGE, f"{image} not found")
    if not label.is_file():
        return PairProblem(SkipReason.MISSING_MASK, f"{label} not found")
    try:
        image_size = read_spatial_size(image, verify)
    except UnreadableImageError as err:
        return PairProblem(SkipReason.UNREADABLE_IMAGE, str(err))
    except NonFiniteImageError as err:
        return PairProblem(SkipReason.NON_FINITE_IMAGE, str(err))
    try:
        label_size = read_spatial_size(label, verify)
    except UnreadableImageError as err:
        return PairProblem(SkipReason.UNREADABLE_MASK, str(err))
    except NonFiniteImageError as err:
        return PairProblem(SkipReason.NON_FINITE_MASK, str(err))
    if image_size != label_size:
        detail = f"image {image} is {format_size(image_size)}, mask {label} is {format_size(label_size)}"
        return PairProblem(SkipReason.SIZE_MISMATCH, detail)
    return None
