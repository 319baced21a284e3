"""The names of the bundle's ``precision`` switch and the floating dtypes they stand for.

One table serves the inferers (which autocast dtype a precision means) and the network (which dtype the frozen
text encoder is stored in), so a name accepted by one is accepted by the other.
"""

from __future__ import annotations

import torch

__all__ = ["PRECISION_DTYPES", "as_dtype"]

PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def as_dtype(value: torch.dtype | str, name: str = "precision") -> torch.dtype:
    """The floating dtype of a precision name (``"bf16"``, ``"torch.bfloat16"``, ...) or of a torch dtype.

    Args:
        value: a name of :data:`PRECISION_DTYPES` (any case, with or without ``torch.``) or a floating dtype.
        name: what the value is, for the error message.

    Raises:
        ValueError: naming ``name`` and the value, for an unknown name or a non-floating dtype.

    Examples::

        >>> as_dtype("BF16"), as_dtype(torch.float16)
        (torch.bfloat16, torch.float16)
    """
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ValueError(f"{name} must be a floating dtype, got {value}.")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in PRECISION_DTYPES:
        raise ValueError(f"{name} must be one of {sorted(PRECISION_DTYPES)} or a torch dtype, got {value!r}.")
    return PRECISION_DTYPES[key]
