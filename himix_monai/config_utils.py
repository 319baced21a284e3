"""
Helpers for the bundle configs: settings that arrive as text, and checks of settings before a run starts.

- :py:func:`as_bool` reads yes/no settings that arrive from the command line as text (``--resume false``);
- :py:func:`check_image_size` checks the configured image size against the network's size divisor.

Nothing heavy is imported at module level (``torch`` only when a network is checked), so the data modules can
use :py:func:`as_bool` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["as_bool", "check_image_size"]


_TRUE = ("true", "yes", "on", "1", "y", "t")
_FALSE = ("false", "no", "off", "0", "n", "f", "none", "null", "")


def as_bool(value: Any, name: str = "value") -> bool:
    """Read a yes/no setting that may come from the command line as text.

    ``python -m monai.bundle run ... --resume false`` passes the string ``"false"`` (only ``True``/``False``
    become booleans), and ``bool("false")`` is True. This accepts booleans, 0/1 and the usual words.

    Args:
        value: a bool, an int 0/1, None, or a string such as ``"true"``, ``"False"``, ``"yes"``, ``"0"``.
        name: the setting's name, for the error message.

    Returns:
        The boolean.

    Raises:
        ValueError: for anything else, naming the setting.
    """
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def check_image_size(image_size: Sequence[int], network: torch.nn.Module | None = None, divisor: int = 32) -> None:
    """Check that the configured image size suits the network before any data is loaded.

    Args:
        image_size: the ``image_size`` setting, ``[H, W]``.
        network: the network; its ``size_divisor`` (HiMix: the image encoder's largest stride) is used when set.
        divisor: the divisor when the network has none.

    Raises:
        ValueError: naming the setting, the divisor and the nearest valid sizes.
    """
    if network is not None:
        from himix_monai.checkpoints import _unwrap  # DataParallel / DDP wrappers

        divisor = int(getattr(_unwrap(network), "size_divisor", divisor))
    sizes = [int(s) for s in image_size]
    if len(sizes) != 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"image_size must be two positive sizes [H, W], got {list(image_size)}.")
    if any(s % divisor for s in sizes):
        lower = [max(divisor, s // divisor * divisor) for s in sizes]
        upper = [-(-s // divisor) * divisor for s in sizes]
        raise ValueError(
            f"image_size {sizes} is not divisible by {divisor} (the image encoder's largest stride); "
            f"use e.g. {lower} or {upper}."
        )
