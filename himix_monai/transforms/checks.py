"""
Checks of loaded images that turn silent failures into errors naming the file.

A NaN or infinite pixel survives MONAI's intensity transforms (``ScaleIntensityRanged(clip=True)`` keeps NaN)
and then makes the training loss NaN (stopping the run without naming the image) or the prediction an empty
mask with a Dice of 0 and exit status 0 (evaluation, inference). :py:class:`EnsureFinited` stops at the
image instead, naming its file. :py:class:`NamedLoadImaged` does the same for a file that cannot be decoded
(MONAI's readers decode lazily, so a truncated picture fails inside ``get_data`` with PIL's "image file is
truncated", naming no file).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import LoadImaged, MapTransform, Transform
from monai.utils import convert_to_tensor

from himix_monai.errors import HiMixError, NonFiniteImageError, UnreadableImageError
from himix_monai.transforms.mask import source_name

__all__ = ["non_finite_counts", "EnsureFinite", "EnsureFinited", "NamedLoadImaged"]

_DEFAULT_ADVICE = (
    "fix or remove the file; training and evaluation check the datalist's files at start "
    "(check_data_files true) and leave such items out with --skip_bad_items true"
)


def non_finite_counts(img: NdarrayOrTensor) -> tuple[int, int]:
    """The numbers of NaN and of infinite values in ``img`` (0, 0 for integer data).

    Args:
        img: an array or tensor.
    """
    values = convert_to_tensor(img, track_meta=False)
    if not (torch.is_floating_point(values) or torch.is_complex(values)):
        return 0, 0
    return int(torch.isnan(values).sum()), int(torch.isinf(values).sum())


class EnsureFinite(Transform):
    """
    Raise :py:class:`~himix_monai.errors.NonFiniteImageError` naming the source file when an image holds NaN or
    infinite values; pass it through unchanged otherwise.

    Args:
        what: how the data is called in the message (``"image"``, ``"mask"``).
        advice: what the user can do, appended to the message.

    Examples::

        EnsureFinite()(torch.tensor([0.0, float("nan")]))  # NonFiniteImageError: ... 1 NaN ...
    """

    def __init__(self, what: str = "image", advice: str = _DEFAULT_ADVICE) -> None:
        self.what = what
        self.advice = advice

    def __call__(self, img: NdarrayOrTensor, source: str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: the loaded data.
            source: its file for the message; by default from the ``MetaTensor``'s ``filename_or_obj``.
        """
        nans, infs = non_finite_counts(img)
        if nans or infs:
            source = source or source_name(img)
            raise NonFiniteImageError(
                f"{source}: the {self.what} has {nans} NaN and {infs} infinite values "
                f"(of {int(torch.as_tensor(img.shape).prod())}); {self.advice}."
            )
        return img


class EnsureFinited(MapTransform):
    """
    Dictionary version of :py:class:`EnsureFinite`: put it right after ``LoadImaged`` (and
    ``EnsureChannelFirstd``) so that the message names the file the values came from.

    Args:
        keys: keys of the data to check.
        advice: what the user can do, appended to the message.
        allow_missing_keys: don't raise an exception if a key is missing.

    Examples::

        Compose([LoadImaged(["image", "label"]), EnsureFinited(["image", "label"]), ...])
    """

    def __init__(self, keys: KeysCollection, advice: str = _DEFAULT_ADVICE, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.advice = advice

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            what = "mask" if key == "label" else str(key)
            EnsureFinite(what, self.advice)(d[key], source=source_name(d[key], d, key))
        return d


class NamedLoadImaged(LoadImaged):
    """
    MONAI's ``LoadImaged`` whose read errors name the file.

    ``LoadImage`` names the file only when no reader accepts it; a reader that accepts the file and then fails
    to decode it (a truncated PNG or JPEG, a cut ``.nii.gz``) raises an error without the file name, and the run
    stops without saying which of its inputs is bad. This class raises
    :py:class:`~himix_monai.errors.UnreadableImageError` naming the file, with the reader's message, from the
    original error. Arguments as ``LoadImaged``.

    Examples::

        load = NamedLoadImaged(keys="image", image_only=True, reader=PILReader(reverse_indexing=False))
        load({"image": "cut.png"})
        # UnreadableImageError: cut.png: cannot read the image (OSError: image file is truncated) ...
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        """Load the images of ``data``; a file that cannot be read raises :py:class:`UnreadableImageError`."""
        try:
            return super().__call__(data, reader)
        except HiMixError:
            raise  # a reader's own error (e.g. DicomSeriesReader's) already names the file and what to do
        except Exception as err:
            files = ", ".join(str(data[key]) for key in self.key_iterator(dict(data)))
            raise UnreadableImageError(
                f"{files}: cannot read the image ({type(err).__name__}: {err}); replace or remove the file "
                "(inference: or leave such items out with skip_bad_items true)"
            ) from err
