"""
Helpers for the bundle configs: settings that arrive as text, and checks of settings before a run starts.

- :py:func:`as_bool` reads yes/no settings that arrive from the command line as text (``--resume false``);
- :py:func:`as_image_size` reads the image size setting (one number is a square);
- :py:func:`check_image_size` checks the configured image size against the network's size divisor;
- :py:func:`find_bundle_root` gives the bundle folder of the running config (``bundle_root``), so that the bundle
  runs from its own folder and from the repository root.

Nothing heavy is imported at module level (``torch`` only when a network is checked), so the data modules can
use :py:func:`as_bool` too.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from himix_monai.errors import SettingError

if TYPE_CHECKING:
    import torch

__all__ = [
    "as_bool",
    "as_image_size",
    "check_image_size",
    "check_replaced_setting",
    "find_bundle_root",
    "unwrap_network",
]


def unwrap_network(network: Any) -> Any:
    """The network inside a ``torch.nn.DataParallel`` or ``DistributedDataParallel`` wrapper, else ``network``.

    Args:
        network: a network, wrapped or not.
    """
    import torch

    if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return network.module
    return network


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
        SettingError: (a ``ValueError``) for anything else, naming the setting.
    """
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingError(f"{name} must be true or false, got {value!r}.")


def as_image_size(image_size: Any, name: str = "image_size") -> list[int]:
    """Read the ``image_size`` setting as ``[H, W]``; one number means a square.

    ``python -m monai.bundle run ... --image_size 64`` passes the int 64 while the configs need two sizes
    (MONAI's ``Resized`` refuses one size for a 2-D image); ``--image_size "[64,48]"`` passes a list.

    Args:
        image_size: an int (square), a sequence of two ints, or their text (``"64"``, ``"[64, 48]"``).
        name: the setting's name, for the error message.

    Returns:
        ``[H, W]``.

    Raises:
        SettingError: for anything else, naming the setting and the accepted forms.

    Examples::

        as_image_size(64)        # [64, 64]
        as_image_size([64, 48])  # [64, 48]
    """
    value = image_size
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        value = [part for part in text.replace(",", " ").split()] if text else []
        if len(value) == 1:
            value = value[0]
    if isinstance(value, bool):
        value = None  # not a size
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value, value]
    try:
        sizes = [int(s) for s in value] if isinstance(value, (list, tuple)) else None
        if sizes is not None and any(float(s) != int(s) for s in value):
            sizes = None
    except (TypeError, ValueError):
        sizes = None
    if sizes is None or len(sizes) != 2 or any(s <= 0 for s in sizes):
        raise SettingError(
            f"{name} must be one positive size (a square, e.g. --{name} 64) or two sizes [H, W] "
            f"(e.g. --{name} \"[64,48]\"), got {image_size!r}."
        )
    return sizes


def check_replaced_setting(name: str, value: Any, replacement: str, reason: str = "") -> None:
    """Refuse a setting that no longer exists, so that a command line that still gives it is not silently ignored.

    MONAI's config parser keeps any ``--name value`` given on the command line, used or not; a removed setting
    kept with the value None and checked here turns an old command into a clear error.

    Args:
        name: the removed setting.
        value: its value in the config (None when not given).
        replacement: the setting to use instead.
        reason: why it was replaced.

    Raises:
        SettingError: when ``value`` is not None.
    """
    if value is not None:
        raise SettingError(
            f"--{name} {value!r}: this setting was replaced by --{replacement}{f' ({reason})' if reason else ''}"
        )


def check_image_size(image_size: Any, network: torch.nn.Module | None = None, divisor: int = 32) -> None:
    """Check that the configured image size suits the network before any data is loaded.

    Args:
        image_size: the ``image_size`` setting, ``[H, W]`` or one size for a square
            (see :py:func:`as_image_size`).
        network: the network; its ``size_divisor`` (HiMix: the image encoder's largest stride) is used when set.
        divisor: the divisor when the network has none.

    Raises:
        SettingError: (a ``ValueError``) naming the setting, the divisor and the nearest valid sizes.
    """
    if network is not None:
        divisor = int(getattr(unwrap_network(network), "size_divisor", divisor))
    sizes = as_image_size(image_size)
    if any(s % divisor for s in sizes):
        lower = [max(divisor, s // divisor * divisor) for s in sizes]
        upper = [-(-s // divisor) * divisor for s in sizes]
        raise SettingError(
            f"image_size {sizes} is not divisible by {divisor} (the image encoder's largest stride); "
            f"use e.g. {lower} or {upper}."
        )


def _running_workflow_root() -> Path | None:
    """The bundle folder of the MONAI ``ConfigWorkflow`` on the call stack, or None."""
    from monai.bundle.workflows import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            workflow = frame.f_locals.get("self")
            if isinstance(workflow, ConfigWorkflow):
                root = Path(workflow.config_root_path)
                return root.parent if root.name == "configs" else root  # as ConfigWorkflow.run puts it on sys.path
            frame = frame.f_back
    finally:
        del frame
    return None


def find_bundle_root(candidates: Sequence[str] = (".", "bundle")) -> str:
    """The bundle folder of the running config: the default of the configs' ``bundle_root``.

    MONAI 1.6.1 gives a config no way to name its own location: ``ConfigParser`` keeps no file path, ``$``
    expressions and ``%`` macros resolve paths against the working directory, and the one object that knows
    where the config file is, the ``ConfigWorkflow`` of ``python -m monai.bundle run`` (``config_root_path``),
    puts the bundle folder on ``sys.path`` only in ``run``, after ``initialize``. A fixed ``"bundle_root":
    "bundle"`` therefore works from the repository root only and ``"."`` from the bundle folder only. This
    returns, in order:

    1. when a MONAI ``ConfigWorkflow`` is evaluating the config (``python -m monai.bundle run``,
       ``create_workflow``): the folder above its config folder, the same folder ``ConfigWorkflow.run`` adds to
       ``sys.path`` (``bundle`` for ``--config_file bundle/configs/inference.json``, ``.`` for
       ``configs/inference.json``, an absolute path for an absolute config path);
    2. otherwise (a bare ``ConfigParser``): the first of ``candidates``, relative to the working directory, that
       holds ``configs/metadata.json``.

    Clients that set ``bundle_root`` themselves (MONAI Label, the model zoo's checks, ``ckpt_export
    --bundle_root``) never call this.

    Args:
        candidates: folders tried, in order, when no ``ConfigWorkflow`` is running.

    Returns:
        The bundle folder, as a path string (relative when the config path was relative).

    Raises:
        FileNotFoundError: when no workflow is running and no candidate holds ``configs/metadata.json``, saying
            to pass ``--bundle_root``.

    Examples::

        "bundle_root": "$himix_monai.config_utils.find_bundle_root()"
    """
    root = _running_workflow_root()
    if root is not None:
        return str(root)
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "configs", "metadata.json")):
            return str(candidate)
    raise FileNotFoundError(
        f"cannot tell the bundle folder: none of {list(candidates)} under {os.getcwd()} holds configs/metadata.json; "
        "pass --bundle_root /path/to/bundle (the folder that holds configs/ and models/)."
    )
