"""
The project's own errors and the command-line hook that shows their message last.

Every error HiMix-MONAI raises for bad input or settings derives from :py:class:`HiMixError`; its message
names the file, row or setting and says what to do. MONAI's bundle parser wraps any exception raised while a
config expression is evaluated in ``RuntimeError: Failed to evaluate ConfigExpression`` (keeping the
original in ``__cause__``), so from ``python -m monai.bundle run ...`` a user used to see that line last,
under a long traceback.

:py:func:`install_command_line_excepthook` fixes the command line only: the bundle's configs call it first
in ``initialize``; it replaces :py:data:`sys.excepthook` when the running program is
``python -m monai.bundle`` (its ``__main__`` module is ``monai.bundle.__main__``, which is also what
``torchrun -m monai.bundle`` runs) and does nothing otherwise. Library use (``ConfigWorkflow`` from Python,
a MONAI Label server, a notebook, tests) keeps normal exceptions, and even on the command line the hook only
changes what is printed for an uncaught exception: the full traceback is printed first (for debugging) and
then, when a :py:class:`HiMixError` is found in the exception's ``__cause__``/``__context__`` chain, its
message, as the last lines of the output (after an ``error:`` prefix).

Limits: an error raised in a DataLoader worker process (``num_workers > 0``) reaches the main process as a
new exception of the same type whose message is the worker's traceback, without the chain; it is printed
as usual. Errors raised before ``initialize`` runs (e.g. a config file that is not valid JSON) are MONAI's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import TracebackType

__all__ = [
    "HiMixError",
    "SettingError",
    "NonFiniteImageError",
    "UnreadableImageError",
    "DatalistError",
    "OutOfSpaceError",
    "find_project_error",
    "is_bundle_command_line",
    "install_command_line_excepthook",
]

_BUNDLE_MAIN_MODULE = "monai.bundle.__main__"


class HiMixError(Exception):
    """Base class of the project's errors: the message names the file, row or setting and what to do."""


class SettingError(HiMixError, ValueError):
    """A bundle setting (``--image_size``, ``--resume`` ...) has a value that cannot be used."""


def find_project_error(error: BaseException | None) -> HiMixError | None:
    """The first :py:class:`HiMixError` in the chain of ``error``, following ``__cause__`` then ``__context__``.

    Args:
        error: an exception, e.g. MONAI's ``RuntimeError: Failed to evaluate ConfigExpression``.

    Returns:
        The project error that caused it (``error`` itself if it is one), or None.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, HiMixError):
            return error
        seen.add(id(error))
        error = error.__cause__ if error.__cause__ is not None else error.__context__
    return None


def is_bundle_command_line() -> bool:
    """True when this process runs ``python -m monai.bundle`` (also under ``torchrun -m monai.bundle``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == _BUNDLE_MAIN_MODULE


def _print_with_project_message(
    previous: Callable[[type[BaseException], BaseException, TracebackType | None], object],
) -> Callable[[type[BaseException], BaseException, TracebackType | None], None]:
    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        previous(kind, error, traceback)  # the full traceback first
        project_error = find_project_error(error)
        if project_error is not None:
            print(f"\nerror: {project_error}", file=sys.stderr, flush=True)

    hook.himix_hook = True  # type: ignore[attr-defined]
    return hook


def install_command_line_excepthook(force: bool = False) -> bool:
    """Show the project's own message last when the bundle, run as a command, stops on an uncaught error.

    Called by the bundle configs first in ``initialize``. Does nothing unless :py:func:`is_bundle_command_line`
    (or ``force``), so library use keeps normal exceptions; installing twice is a no-op.

    Args:
        force: install even when not running ``python -m monai.bundle`` (for tests).

    Returns:
        True when the hook is (now or already) installed.

    Examples::

        # bundle/configs/train.json
        "initialize": ["$himix_monai.errors.install_command_line_excepthook()", ...]
    """
    if not (force or is_bundle_command_line()):
        return False
    if not getattr(sys.excepthook, "himix_hook", False):
        sys.excepthook = _print_with_project_message(sys.excepthook)
    return True


class NonFiniteImageError(HiMixError, ValueError):
    """An image or mask holds NaN or infinite values; the message names the file."""


class UnreadableImageError(HiMixError, OSError):
    """An image or mask file cannot be read (corrupt, truncated or of an unsupported format); the message names it."""


class DatalistError(HiMixError, ValueError):
    """A datalist, an annotation file or one of its rows is invalid; the message names the file (and row)."""


class OutOfSpaceError(HiMixError, OSError):
    """A file could not be written because its disk (or the user's quota) is full; the message names the file, the
    free space left and what to do. Raised by :py:func:`himix_monai.files.atomic_path`, so no earlier file was
    replaced."""
