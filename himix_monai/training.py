"""
Reliable training for the HiMix bundle: resumable state, safe checkpoint loading, loud failures, checked data.

The MONAI engines (``SupervisedTrainer`` / ``SupervisedEvaluator``) run the loops; this module adds the pieces a
long run on real data needs:

- :py:class:`TrainingStateCheckpoint` saves the latest full training state (network, optimizer, lr scheduler,
  trainer epoch/iteration, early-stopping counter, the evaluator's best metric and the best-model saver's
  record) to one file at every epoch end and every N iterations, atomically, and resumes from it;
- :py:class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` with atomic writes (MONAI's own writes in
  place and deletes the previous best model before writing the new one);
- :py:func:`load_checkpoint_file` loads with ``torch.load(..., weights_only=True)`` and clear errors;
  :py:func:`load_network_weights` and :py:class:`SafeCheckpointLoader` compare keys and shapes first and raise
  one readable :py:class:`CheckpointMismatchError` for a checkpoint of another configuration;
- :py:class:`StopOnNonFiniteLoss` stops training with :py:class:`NonFiniteLossError` (epoch, iteration, loss)
  instead of ignite's silent ``TerminateOnNan``;
- :py:class:`LossCSVWriter` logs every iteration's loss to a CSV file (full precision, for plots and
  reproducibility checks);
- :py:func:`load_checked_datalist` loads a datalist split and checks its files up front (missing, unreadable,
  size mismatch, 3-D volume), raising one :py:class:`~himix_monai.data.datalist.DatalistError` that lists the
  bad items, or skipping and counting them;
- :py:func:`check_image_size` checks the configured image size against the network's size divisor;
- :py:func:`as_bool` reads yes/no settings that arrive from the command line as text (``--resume false``).

All checkpoints written here hold plain state dicts (tensors, numbers, strings, lists, dicts) only, so they
load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler
from monai.networks.utils import copy_model_state
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import

from himix_monai.data.datalist import (
    DatalistError,
    PairProblem,
    UnreadableImageError,
    check_image_label_pair,
    load_datalist,
    read_spatial_size,
)

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
BaseSaveHandler, _ = optional_import(
    "ignite.handlers.checkpoint", IgniteInfo.OPT_IMPORT_VERSION, min_version, "BaseSaveHandler"
)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "as_bool",
    "CheckpointError",
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "save_checkpoint_atomically",
    "load_checkpoint_file",
    "network_signature",
    "describe_state_mismatch",
    "load_network_weights",
    "SafeCheckpointLoader",
    "AtomicCheckpointSaver",
    "TrainingStateCheckpoint",
    "StopOnNonFiniteLoss",
    "LossCSVWriter",
    "load_checked_datalist",
    "check_image_size",
]

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # mismatched keys of each kind shown in an error message
_MAX_LISTED_ITEMS = 10  # bad datalist items shown in an error message
_META_KEY = "meta"
_CHECKPOINT_FORMAT = 1
_STATE_DICT_KEYS = ("model", "network", "net", "state_dict")


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


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe to load or not of the expected layout."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the network (other keys, shapes or settings); the message lists the differences."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and the iteration."""


# ----------------------------------------------------------------------------------------------------------------
# writing and reading checkpoint files
# ----------------------------------------------------------------------------------------------------------------


def _file_mode() -> int:
    """``0o666`` minus the process umask: the mode a plain ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_checkpoint_atomically(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with ``torch.save`` so that ``path`` is never left half-written.

    The data is written to a temporary file in the same folder, flushed and fsynced, given the usual file
    permissions, then moved over ``path`` with :py:func:`os.replace`. A crash or a kill at any moment leaves
    either the previous file or the complete new one (and at worst a stray ``.<name>.*.tmp`` file).

    Args:
        obj: what to save, e.g. a dict of state dicts.
        path: the checkpoint file; missing parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, _file_mode())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` and turn failures into clear errors.

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``; CPU by default (``load_state_dict`` copies to the parameters'
            devices).

    Returns:
        The loaded object (usually a dict of state dicts).

    Raises:
        CheckpointError: when the file is missing, truncated or corrupt, or holds pickled Python objects other
            than tensors and plain containers (these are not loaded, for safety).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not loaded: it holds Python objects other than tensors and plain containers and is loaded "
            f"with weights_only=True for safety ({first_line}). Re-save it as a plain state dict, e.g. "
            "torch.save(model.state_dict(), path)."
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for truncated or corrupt files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(err).__name__}: {first_line}); the file is truncated, "
            "corrupt or not a PyTorch checkpoint."
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# comparing a checkpoint with a network
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return network.module
    return network


def network_signature(network: torch.nn.Module) -> dict[str, Any]:
    """Settings of a network that change its results but not its weight shapes.

    Today: the class name and the number of heads of every attention module (``num_heads`` does not change the
    shapes of the attention weights, so a checkpoint of another ``num_heads`` would load silently).

    Args:
        network: the network (``DataParallel`` wrappers are unwrapped).

    Returns:
        ``{"class": "HiMix", "num_heads": {"stages.0.self_attention": 8, ...}}``.
    """
    network = _unwrap(network)
    heads = {
        name: int(module.num_heads)
        for name, module in network.named_modules()
        if name and isinstance(getattr(module, "num_heads", None), int)
    }
    return {"class": type(network).__name__, "num_heads": heads}


def _frozen_keys(network: torch.nn.Module) -> list[str]:
    """State-dict keys of the parameters that are not trained (``requires_grad=False``), e.g. the text encoder."""
    return [name for name, parameter in _unwrap(network).named_parameters() if not parameter.requires_grad]


def _fingerprint(network: torch.nn.Module, keys: Sequence[str]) -> float:
    """A checksum of the given parameters: the sum of their absolute values, in float64."""
    parameters = dict(_unwrap(network).named_parameters())
    with torch.no_grad():
        return float(sum(float(parameters[k].detach().double().abs().sum()) for k in keys))


def _trained_state(
    network: torch.nn.Module, fingerprints: dict[tuple[str, ...], float] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state dict without the frozen parameters, and a record of those (keys and checksum).

    ``fingerprints`` caches the checksum per set of frozen keys (frozen weights do not change during training).
    """
    frozen = _frozen_keys(network)
    skip = set(frozen)
    state = OrderedDict((k, v) for k, v in _unwrap(network).state_dict().items() if k not in skip)
    cache = {} if fingerprints is None else fingerprints
    if tuple(frozen) not in cache:
        cache[tuple(frozen)] = _fingerprint(network, frozen)
    return state, {"keys": frozen, "fingerprint": cache[tuple(frozen)]}


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _format_shape(shape: tuple[int, ...] | None) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")" if shape is not None else "(not a tensor)"


def _group(key: str) -> str:
    return key.split(".", 1)[0]


def _listed(keys: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> Mapping[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    return state


def describe_state_mismatch(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    source: str = "the checkpoint",
    target: str = "the network",
    limit: int = _MAX_LISTED,
) -> str | None:
    """Compare a network's state dict with a checkpoint's, by keys and shapes.

    Args:
        expected: the network's ``state_dict()``.
        found: the checkpoint's state dict.
        source: how to name the checkpoint in the message, usually its file.
        target: how to name the network in the message.
        limit: how many mismatched keys of each kind to list.

    Returns:
        None when every key is in both and every shape is equal; else a multi-line report: counts, the first
        ``limit`` keys of each kind (with both shapes for shape mismatches), the network parts concerned and a
        hint on the settings that change them.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and _shape(expected[k]) != _shape(found[k])]
    if not (missing or unexpected or reshaped):
        return None
    lines = [
        f"{source} does not fit {target}: of {len(expected)} network weights, {len(missing)} are missing from the "
        f"checkpoint and {len(reshaped)} have another shape; {len(unexpected)} of the checkpoint's {len(found)} "
        "weights are unknown to the network."
    ]
    if reshaped:
        lines.append("  other shape (checkpoint -> network):")
        lines += [
            f"    {k}: {_format_shape(_shape(found[k]))} -> {_format_shape(_shape(expected[k]))}"
            for k in reshaped[:limit]
        ]
        if len(reshaped) > limit:
            lines.append(f"    ... ({len(reshaped) - limit} more)")
    if missing:
        lines.append(f"  missing from the checkpoint: {_listed(missing, limit)}")
    if unexpected:
        lines.append(f"  not in the network: {_listed(unexpected, limit)}")
    parts = Counter(_group(k) for k in missing + unexpected + reshaped)
    lines.append("  parts concerned: " + ", ".join(f"{part} ({count})" for part, count in parts.most_common()))
    first = next(iter(expected), None)
    if first in reshaped and len(_shape(expected[first]) or ()) > 1:
        old, new = _shape(found[first]), _shape(expected[first])
        if old and new and len(old) == len(new) and old[0] == new[0] and old[1] != new[1]:
            lines.append(f"  the first layer takes {old[1]} input channels in the checkpoint, {new[1]} in the network.")
    lines.append(
        "Was it trained with a different image_encoder / text encoder (text_encoder, use_text) / in_channels / "
        "out_channels? Use the settings it was trained with (e.g. the same --image_encoder and dataset preset)."
    )
    return "\n".join(lines)


def _describe_signature_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any], source: str) -> str | None:
    differences = []
    if found.get("class") != expected.get("class"):
        differences.append(f"network class {found.get('class')!r} in the checkpoint, {expected.get('class')!r} now")
    found_heads, expected_heads = dict(found.get("num_heads", {})), dict(expected.get("num_heads", {}))
    if found_heads != expected_heads:
        changed = [
            f"{name}: {found_heads.get(name)} -> {expected_heads.get(name)}"
            for name in sorted(set(found_heads) | set(expected_heads))
            if found_heads.get(name) != expected_heads.get(name)
        ]
        differences.append("attention heads (checkpoint -> network): " + _listed(changed, 3))
    if not differences:
        return None
    return (
        f"{source} was saved from a network with other settings: " + "; ".join(differences) + ". "
        "Was it trained with a different num_heads (network_def#num_heads)? Use the settings it was trained with."
    )


def _network_state_from_checkpoint(checkpoint: Any, key: str | None, source: str) -> Mapping[str, Any]:
    if key is not None:
        if not isinstance(checkpoint, Mapping) or key not in checkpoint:
            found = ", ".join(map(repr, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise CheckpointError(f"{source}: no entry {key!r} (found: {found})")
        state = checkpoint[key]
    elif _is_state_dict(checkpoint):
        state = checkpoint
    else:
        entries = [k for k in _STATE_DICT_KEYS if isinstance(checkpoint, Mapping) and _is_state_dict(checkpoint.get(k))]
        if not entries:
            found = ", ".join(map(repr, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise CheckpointError(
                f"{source}: not a network state dict and no network entry {list(_STATE_DICT_KEYS)} (found: {found})"
            )
        state = checkpoint[entries[0]]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: the network entry is a {type(state).__name__}, not a state dict")
    return _strip_prefix(state)


def _check_and_load_network(
    network: torch.nn.Module,
    state: Mapping[str, Any],
    source: str,
    signature: Mapping[str, Any] | None = None,
    frozen: Mapping[str, Any] | None = None,
    target: str | None = None,
) -> None:
    """Compare, then load. ``frozen`` is the record of frozen parameters left out of ``state``, if any."""
    network = _unwrap(network)
    expected = network.state_dict()
    if frozen is not None:
        skip = set(frozen.get("keys", []))
        expected = OrderedDict((k, v) for k, v in expected.items() if k not in skip)
    report = describe_state_mismatch(expected, state, source=source, target=target or type(network).__name__)
    if report is not None:
        raise CheckpointMismatchError(report)
    if signature is not None:
        report = _describe_signature_mismatch(network_signature(network), signature, source)
        if report is not None:
            raise CheckpointMismatchError(report)
    if frozen is not None:
        keys = list(frozen.get("keys", []))
        current = _frozen_keys(network)
        if sorted(current) != sorted(keys):
            raise CheckpointMismatchError(
                f"{source} was saved without its {len(keys)} frozen (untrained) weights, but this network has "
                f"{len(current)} frozen weights with other names; was it trained with a different text encoder?"
            )
        saved, now = float(frozen.get("fingerprint", 0.0)), _fingerprint(network, keys)
        if not math.isclose(saved, now, rel_tol=1e-6, abs_tol=1e-6):
            raise CheckpointMismatchError(
                f"{source} was trained with other frozen weights (checksum {saved:.6g}, this network {now:.6g}): "
                "was it trained with a different text encoder (text_encoder) or pretrained image encoder? "
                "Use the same encoders to resume."
            )
    result = network.load_state_dict(state, strict=frozen is None)
    if frozen is not None and (result.unexpected_keys or set(result.missing_keys) - set(frozen.get("keys", []))):
        raise CheckpointMismatchError(f"{source}: unexpected network keys after comparison: {result}")


def load_network_weights(
    network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu", key: str | None = None
) -> torch.nn.Module:
    """Load network weights from a checkpoint safely, with one readable error when they do not fit.

    The file is loaded with ``weights_only=True``. It may be a plain state dict (``models/model.pt``) or a
    dict with the state dict under ``key`` (default: the first of ``model``, ``network``, ``net``,
    ``state_dict`` that holds one, e.g. ``models/checkpoint_latest.pt``). A ``module.`` prefix left by
    ``DataParallel`` is removed. Keys and shapes are compared before loading; a checkpoint that also records
    the network's settings (:py:class:`TrainingStateCheckpoint` does) is compared by those as well.

    Args:
        network: the network to load into (``DataParallel`` wrappers are unwrapped).
        path: the checkpoint file.
        map_location: passed to ``torch.load``.
        key: the checkpoint entry that holds the network state dict; None to detect it.

    Returns:
        ``network``, with the weights loaded.

    Raises:
        CheckpointError: the file is missing, unreadable or unsafe, or holds no network state dict.
        CheckpointMismatchError: the keys, shapes or recorded settings differ; the message gives counts, the
            first few keys with both shapes, the network parts concerned and a hint.

    Examples::

        net = HiMix(in_channels=1, image_encoder="convnext_tiny", text_encoder=minilm_path)
        load_network_weights(net, "bundle/models/model.pt")
    """
    checkpoint = load_checkpoint_file(path, map_location=map_location)
    state = _network_state_from_checkpoint(checkpoint, key, str(path))
    signature = frozen = None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(_META_KEY), Mapping):
        signature = checkpoint[_META_KEY].get("network_signature")
        frozen = checkpoint[_META_KEY].get("frozen_weights")
    _check_and_load_network(network, state, str(path), signature, frozen)
    return network


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that loads with ``weights_only=True`` and reports configuration mismatches.

    A drop-in replacement (same arguments). Every ``torch.nn.Module`` in ``load_dict`` is compared with its
    checkpoint entry before anything is loaded: with ``strict=True`` and ``strict_shape=True`` (the defaults) a
    checkpoint of another configuration raises one :py:class:`CheckpointMismatchError` (counts, the first few
    keys with shapes, a hint) instead of PyTorch's list of every missing key. A missing, truncated or unsafe file
    raises :py:class:`CheckpointError` naming it.

    Args:
        load_path: the checkpoint file.
        load_dict: the objects to load, e.g. ``{"model": network}``; a single network entry also loads a
            checkpoint that is directly its state dict (``models/model.pt``) or that holds it under ``model``,
            ``network``, ``net`` or ``state_dict`` (``models/checkpoint_latest.pt``, whose recorded settings and
            frozen-weight checksum are checked too).
        name: logger name; None uses the engine's logger.
        map_location: passed to ``torch.load``.
        strict: require the same keys (see ``CheckpointLoader``).
        strict_shape: require the same shapes; False loads the matching weights only and skips non-network
            objects (transfer learning, see ``CheckpointLoader``).

    Examples::

        {
            "_target_": "himix_monai.training.SafeCheckpointLoader",
            "load_path": "$@ckpt_dir + '/model.pt'",
            "load_dict": {"model": "@network"},
            "map_location": "@device"
        }
    """

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: the ignite engine (trainer, evaluator or inference engine).
        """
        source = str(self.load_path)
        checkpoint = load_checkpoint_file(self.load_path, map_location=self.map_location)
        meta = checkpoint.get(_META_KEY) if isinstance(checkpoint, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        first_key, first = next(iter(self.load_dict.items()))
        if len(self.load_dict) == 1 and (not isinstance(checkpoint, Mapping) or first_key not in checkpoint):
            if isinstance(first, torch.nn.Module):  # a plain state dict, or one under "model", "network", ...
                checkpoint = {first_key: _network_state_from_checkpoint(checkpoint, None, source)}
            else:
                checkpoint = {first_key: checkpoint}
        missing = [k for k in self.load_dict if k not in checkpoint]
        if missing and self.strict:
            raise CheckpointError(
                f"{source}: no entries {missing} (found: {', '.join(map(repr, checkpoint))}); "
                "the load_dict names must match the names the checkpoint was saved with."
            )
        load_dict = {k: v for k, v in self.load_dict.items() if k in checkpoint}
        checkpoint = dict(checkpoint)
        for k, obj in list(load_dict.items()):
            if not isinstance(obj, torch.nn.Module):
                continue
            state = _strip_prefix(checkpoint[k]) if isinstance(checkpoint[k], Mapping) else checkpoint[k]
            if not self.strict_shape:
                checkpoint[k] = copy_model_state(_unwrap(obj), state, inplace=False)[0]
            elif self.strict:  # compare keys, shapes and recorded settings, then load
                target = f"{k!r} ({type(_unwrap(obj)).__name__})"
                _check_and_load_network(
                    obj, state, source, meta.get("network_signature"), meta.get("frozen_weights"), target
                )
                del load_dict[k]
            else:
                checkpoint[k] = state
        if not self.strict_shape:
            skipped = [k for k, obj in load_dict.items() if not isinstance(obj, torch.nn.Module)]
            if skipped:
                self.logger.warning(f"strict_shape is False: loading networks only, skipping {skipped}.")
            load_dict = {k: v for k, v in load_dict.items() if k not in skipped}
        prior_max_epochs = engine.state.max_epochs
        if load_dict:
            Checkpoint.load_objects(to_load=load_dict, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise CheckpointError(
                f"{self.load_path}: the checkpoint is at epoch {engine.state.epoch}, beyond this run's max_epochs "
                f"({prior_max_epochs}); raise the number of epochs to continue training from it."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored {sorted(self.load_dict)} from {self.load_path}")


# ----------------------------------------------------------------------------------------------------------------
# atomic best-model saving
# ----------------------------------------------------------------------------------------------------------------


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: atomic writes with normal permissions; an optional fixed file name."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        save_checkpoint_atomically(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is not None:
            return  # the next save replaces the fixed file atomically; deleting it first would risk losing it
        (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically.

    MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)`` (for group-readable files),
    and with a fixed ``key_metric_filename`` it deletes the previous best model before writing the new one: a
    kill in between leaves no ``model.pt`` or a truncated one. This subclass writes every file through
    :py:func:`save_checkpoint_atomically` (temporary file, fsync, ``os.replace``, the usual permissions) and
    overwrites a fixed file name in place instead of deleting it first. Arguments and file names are those of
    ``CheckpointSaver``.

    Args:
        save_dir: the folder of the checkpoints.
        save_dict: the objects to save, e.g. ``{"model": network}``.
        kwargs: the other ``CheckpointSaver`` arguments (``save_key_metric``, ``key_metric_filename``,
            ``save_interval``, ...).
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        fixed = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attribute, filename in fixed.items():
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(save_dir, filename)


# ----------------------------------------------------------------------------------------------------------------
# resumable training state
# ----------------------------------------------------------------------------------------------------------------


def _rank() -> int:
    """This process's rank in a ``torch.distributed`` job; 0 when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return 0


def _is_evaluator(obj: Any) -> bool:
    from monai.engines import Evaluator

    return isinstance(obj, Evaluator)


def _state_of(obj: Any) -> Any:
    """A plain state dict of one training object (None when there is nothing to save yet)."""
    if isinstance(obj, torch.nn.Module):
        return _unwrap(obj).state_dict()
    if isinstance(obj, EarlyStopHandler):
        return None if obj._handler is None else obj._handler.state_dict()  # ignite EarlyStopping: counter, best
    if isinstance(obj, CheckpointSaver):
        record = obj._key_metric_checkpoint
        return None if record is None else record.state_dict()  # the (score, file) list of the best model(s)
    if _is_evaluator(obj):
        return {"best_metric": obj.state.best_metric, "best_metric_epoch": obj.state.best_metric_epoch}
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"cannot save the state of a {type(obj).__name__}: it has no state_dict().")


def _restore(obj: Any, state: Any) -> None:
    if isinstance(obj, EarlyStopHandler):
        if obj._handler is None:
            raise CheckpointError("the early-stopping handler has no trainer yet: call set_trainer before resuming.")
        obj._handler.load_state_dict(state)
    elif isinstance(obj, CheckpointSaver):
        obj.load_state_dict(state)
    elif _is_evaluator(obj):
        obj.state.best_metric = state["best_metric"]
        obj.state.best_metric_epoch = state["best_metric_epoch"]
    else:
        obj.load_state_dict(state)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def _non_finite_weights(network: torch.nn.Module) -> list[str]:
    bad = []
    for name, value in _unwrap(network).state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


def _loss_of(output: Any) -> Any:
    if isinstance(output, Mapping):
        return output.get(CommonKeys.LOSS)
    if isinstance(output, Sequence) and output and isinstance(output[0], Mapping):
        return output[0].get(CommonKeys.LOSS)
    return None


class TrainingStateCheckpoint:
    """Save the latest full training state to one file, atomically, and resume an interrupted run from it.

    Saved at every epoch end (after the epoch's lr-scheduler step and validation), every
    ``every_n_iterations`` iterations within an epoch, and when the run completes. The file is a dict of plain
    state dicts, one per ``save_dict`` entry, plus ``"meta"`` (epoch, iteration, whether the run finished, the
    network's settings, the last loss, the time), written with :py:func:`save_checkpoint_atomically`, so a kill
    never leaves a broken file, and loadable with ``torch.load(..., weights_only=True)``.

    What is saved per kind of object in ``save_dict``:

    - ``torch.nn.Module`` (the first one; one network per checkpoint): its ``state_dict()`` (unwrapped from
      ``DataParallel``/``DDP``), without the frozen parameters unless ``save_frozen``;
    - the trainer (ignite ``Engine``): ``epoch_length``, ``max_epochs``, ``iteration``;
    - MONAI ``EarlyStopHandler``: ignite ``EarlyStopping``'s ``counter`` and ``best_score``;
    - MONAI ``Evaluator``: ``best_metric`` and ``best_metric_epoch``;
    - MONAI ``CheckpointSaver``: its best-model record (score and file), so a resumed run overwrites
      ``model.pt`` only with a better model;
    - anything else (optimizer, lr scheduler): ``state_dict()``.

    A state is not saved when the last loss or a network weight is NaN or infinite (the previous file is kept).

    In a ``torch.distributed`` job attach it on every rank: every rank loads the state when resuming, only rank 0
    writes. Entries of ``save_dict`` that are None (e.g. a handler disabled on this rank) are skipped.

    With ``resume=True`` the file is loaded when the trainer starts: the network is checked first (keys, shapes
    and settings, see :py:func:`load_network_weights`), then everything else is restored and the trainer
    continues from the saved iteration (mid-epoch too: the rest of that epoch is run) up to the configured
    number of epochs, so a resumed run ends with as many epochs as an uninterrupted one. Without a file it logs
    that and starts fresh. A run that had finished (e.g. stopped early) is not continued.

    Args:
        save_path: the checkpoint file, e.g. ``models/checkpoint_latest.pt``.
        save_dict: the objects to save and restore by name, e.g.
            ``{"network": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer,
            "early_stopping": early_stop_handler, "evaluator": evaluator, "best_model_saver": saver}``.
            It must contain the trainer engine that the handler is attached to (under any name).
        every_n_iterations: also save every N iterations within an epoch; 0 saves at epoch ends only.
        resume: load ``save_path`` when the trainer starts, if it exists (text such as ``"false"`` is read as a
            boolean, see :py:func:`as_bool`).
        save_frozen: also save the network's frozen parameters (``requires_grad=False``: the pretrained text
            encoder, about 90% of HiMix's weights). By default they are left out, which makes the file several
            times smaller and faster to write; their names and a checksum are recorded instead, and resuming
            checks that the rebuilt network has the same frozen weights.
        map_location: passed to ``torch.load`` when resuming.
        name: logger name; None uses the trainer's logger.

    Examples::

        "checkpoint_saver": {
            "_target_": "himix_monai.training.TrainingStateCheckpoint",
            "save_path": "$@ckpt_dir + '/checkpoint_latest.pt'",
            "save_dict": {"network": "@network", "optimizer": "@optimizer", "trainer": "@train#trainer"},
            "every_n_iterations": 50,
            "resume": "@resume"
        }
        "run": ["$@train#checkpoint_saver.attach(@train#trainer)", "$@train#trainer.run()"]
    """

    def __init__(
        self,
        save_path: str | os.PathLike,
        save_dict: Mapping[str, Any],
        every_n_iterations: int = 0,
        resume: bool = False,
        save_frozen: bool = False,
        map_location: Any = "cpu",
        name: str | None = None,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save.")
        if _META_KEY in save_dict:
            raise ValueError(f"{_META_KEY!r} is reserved for the checkpoint's metadata; rename that save_dict entry.")
        if int(every_n_iterations) < 0:
            raise ValueError(f"every_n_iterations must be 0 (epoch ends only) or positive, got {every_n_iterations}.")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.every_n_iterations = int(every_n_iterations)
        self.resume = as_bool(resume, "resume")
        self.save_frozen = as_bool(save_frozen, "save_frozen")
        self.map_location = map_location
        self._name = name
        self.logger = logging.getLogger(name)
        self.last_saved_iteration: int | None = None
        self._fingerprints: dict[tuple[str, ...], float] = {}

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the trainer; it must be one of the objects in ``save_dict``.
        """
        if not any(obj is engine for obj in self.save_dict.values()):
            raise ValueError("TrainingStateCheckpoint: the engine it is attached to must be in save_dict.")
        if self._name is None:
            self.logger = engine.logger
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.every_n_iterations > 0:
            event = Events.ITERATION_COMPLETED(every=self.every_n_iterations)
            engine.add_event_handler(event, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    # saving ---------------------------------------------------------------------------------------------------

    def iteration_completed(self, engine: Engine) -> None:
        """Save within an epoch; the last iteration of an epoch is saved at the epoch end instead (after the
        lr-scheduler step and validation), so that a resumed run does not skip them."""
        epoch_length = engine.state.epoch_length
        if epoch_length and engine.state.iteration % epoch_length == 0:
            return
        self.save(engine)

    def completed(self, engine: Engine) -> None:
        """Save the final state, marked as finished, unless the epoch end just saved it (a run that ends at
        ``max_epochs`` needs no mark; one that stopped early does, so that it is not resumed)."""
        max_epochs = engine.state.max_epochs
        reached_max = max_epochs is None or engine.state.epoch >= max_epochs
        if self.last_saved_iteration == engine.state.iteration and reached_max:
            return
        self.save(engine, finished=True)

    def state(self, engine: Engine, finished: bool = False) -> dict[str, Any]:
        """The checkpoint content for the engine's current state.

        Args:
            engine: the trainer.
            finished: mark the run as finished.
        """
        content: dict[str, Any] = {}
        signature = frozen = None
        for key, obj in self.save_dict.items():
            if obj is None:  # e.g. a handler disabled on this rank
                content[key] = None
            elif isinstance(obj, torch.nn.Module) and signature is None:
                signature = network_signature(obj)
                if self.save_frozen:
                    content[key] = _state_of(obj)
                else:
                    content[key], frozen = _trained_state(obj, self._fingerprints)
            else:
                content[key] = _state_of(obj)
        loss = _loss_of(engine.state.output)
        content[_META_KEY] = {
            "format": _CHECKPOINT_FORMAT,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "epoch_length": int(engine.state.epoch_length or 0),
            "max_epochs": int(engine.state.max_epochs or 0),
            "finished": bool(finished),
            "loss": None if loss is None else float(loss),
            "network_signature": signature,
            "frozen_weights": frozen,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        return content

    def save(self, engine: Engine, finished: bool = False) -> None:
        """Save the state atomically, unless the last loss or a network weight is not finite.

        In a ``torch.distributed`` job only rank 0 writes (all ranks hold the same state).

        Args:
            engine: the trainer.
            finished: mark the run as finished.
        """
        if _rank() != 0:
            self.last_saved_iteration = int(engine.state.iteration)
            return
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        loss = _loss_of(engine.state.output)
        if loss is not None and not _is_finite_number(loss):
            self.logger.error(f"not saving the training state at {where}: the loss is {float(loss)}.")
            return
        for obj in self.save_dict.values():
            if isinstance(obj, torch.nn.Module):
                bad = _non_finite_weights(obj)
                if bad:
                    self.logger.error(
                        f"not saving the training state at {where}: {len(bad)} network weights hold NaN/inf "
                        f"(e.g. {bad[0]}); keeping {self.save_path}."
                    )
                    return
        save_checkpoint_atomically(self.state(engine, finished), self.save_path)
        self.last_saved_iteration = int(engine.state.iteration)
        self.logger.info(f"saved the training state at {where} to {self.save_path}")

    # resuming -------------------------------------------------------------------------------------------------

    def load(self, engine: Engine) -> None:
        """Restore the saved state into the objects of ``save_dict`` (the trainer is started at ``STARTED``).

        Args:
            engine: the trainer.

        Raises:
            CheckpointError: the file is unreadable or lacks an entry of ``save_dict``; the trainer's epoch
                length differs (other batch size or data) or its epoch is beyond ``max_epochs``.
            CheckpointMismatchError: the network does not fit the saved one.
        """
        if not self.save_path.is_file():
            self.logger.warning(f"resume is set but there is no training state at {self.save_path}; starting fresh.")
            return
        source = str(self.save_path)
        checkpoint = load_checkpoint_file(self.save_path, map_location=self.map_location)
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(_META_KEY), Mapping):
            raise CheckpointError(f"{source}: not a training-state checkpoint (no {_META_KEY!r} entry).")
        meta = checkpoint[_META_KEY]
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise CheckpointError(
                f"{source}: no saved state for {missing} (saved: {[k for k in checkpoint if k != _META_KEY]}); "
                "delete it, or set resume to false, to start fresh."
            )
        # the network first: a checkpoint of another configuration must fail before anything is changed
        networks = [k for k, obj in self.save_dict.items() if isinstance(obj, torch.nn.Module)][:1]
        for key in networks:
            _check_and_load_network(
                self.save_dict[key], checkpoint[key], source, meta.get("network_signature"), meta.get("frozen_weights")
            )
        prior_max_epochs = engine.state.max_epochs
        epoch_length = engine.state.epoch_length
        for key, obj in self.save_dict.items():
            if key in networks or obj is None or checkpoint[key] is None:
                continue
            if obj is engine:
                self._restore_trainer(engine, checkpoint[key], source)
            else:
                _restore(obj, checkpoint[key])
        engine.state.max_epochs = prior_max_epochs
        engine.state.epoch_length = epoch_length
        self.last_saved_iteration = int(engine.state.iteration)
        length = engine.state.epoch_length or 1
        done = (
            f"{engine.state.epoch} epochs done (iteration {engine.state.iteration}, "
            f"{engine.state.iteration - engine.state.epoch * length} of {length} into the next epoch)"
        )
        stopped_early = bool(meta.get("finished")) and int(meta.get("epoch", 0)) < int(meta.get("max_epochs", 0))
        if stopped_early and engine.state.epoch < (prior_max_epochs or 0):
            self.logger.warning(
                f"{source}: that run had finished after {engine.state.epoch} epochs (stopped early); "
                "nothing to resume. "
                "Set resume to false (or remove the file) to train again."
            )
            engine.terminate()
            return
        self.logger.info(f"resumed from {source}: {done}; training until epoch {prior_max_epochs}.")

    def _restore_trainer(self, engine: Engine, state: Mapping[str, Any], source: str) -> None:
        saved_length = state.get("epoch_length")
        if saved_length and engine.state.epoch_length and int(saved_length) != int(engine.state.epoch_length):
            raise CheckpointError(
                f"{source}: saved with {saved_length} iterations per epoch, this run has {engine.state.epoch_length} "
                "(another batch_size or datalist?); resume with the same settings, or set resume to false."
            )
        saved_epoch = int(state["iteration"]) // int(saved_length or engine.state.epoch_length or 1)
        max_epochs = engine.state.max_epochs
        if max_epochs is not None and saved_epoch > max_epochs:
            raise CheckpointError(
                f"{source}: the saved run is at epoch {saved_epoch}, beyond this run's {max_epochs} epochs; "
                "raise epochs to continue it."
            )
        engine.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# non-finite loss and loss logging
# ----------------------------------------------------------------------------------------------------------------


def _default_loss(output: Any) -> Any:
    return _loss_of(output)


class StopOnNonFiniteLoss:
    """Stop training with :py:class:`NonFiniteLossError` as soon as the loss is NaN or infinite.

    ignite's ``TerminateOnNan`` ends the run quietly, and the bundle command then exits with status 0. This
    handler raises instead, so the command fails (non-zero exit) with a message naming the epoch, the iteration
    and the loss, and the run stops before anything saves the bad state. Attach it before the handlers that save
    checkpoints (in the bundle it is a trainer handler; the state checkpoint is attached in ``run``). In a
    ``torch.distributed`` job every rank raises: the ranks agree through an all-reduce of a flag per iteration.

    Args:
        output_transform: gets the loss from ``engine.state.output``; default: ``output["loss"]``.
        checkpoint_path: the training-state file to point to in the message (the last good state).

    Raises:
        NonFiniteLossError: from the ``ITERATION_COMPLETED`` event.
    """

    def __init__(
        self, output_transform: Callable[[Any], Any] = _default_loss, checkpoint_path: str | os.PathLike | None = None
    ) -> None:
        self.output_transform = output_transform
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        bad = loss is not None and not _is_finite_number(loss)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop together, else the others wait forever in the next all-reduce
            device = loss.device if isinstance(loss, torch.Tensor) else torch.device("cpu")
            flag = torch.tensor([1.0 if bad else 0.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() > 0 and not bad:
                raise NonFiniteLossError(
                    f"the training loss of another rank is not finite at epoch {engine.state.epoch}, iteration "
                    f"{engine.state.iteration} of the run; training stopped (see that rank's message)."
                )
        if not bad:
            return
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        state = engine.state
        in_epoch = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
        message = (
            f"the training loss is {value} at epoch {state.epoch}, iteration {in_epoch} of {state.epoch_length} "
            f"(iteration {state.iteration} of the run); training stopped."
        )
        if self.checkpoint_path is not None:
            if self.checkpoint_path.is_file():
                message += (
                    f" The last training state saved before this (with a finite loss and weights) is kept in "
                    f"{self.checkpoint_path}; fix the cause, then resume with --resume true or start afresh."
                )
            else:
                message += f" No training state was saved yet ({self.checkpoint_path})."
        message += (
            " Common causes: a learning rate that is too high, fp16 overflow (try bf16 or fp32), or NaN/inf in an "
            "input image."
        )
        raise NonFiniteLossError(message)


class LossCSVWriter:
    """Append every iteration's loss to a CSV file: ``epoch,iteration,loss`` (full precision).

    The file is created with a header when missing and appended to otherwise, so a resumed run continues it
    (iterations repeated after a resume are the ones that were run again). In a ``torch.distributed`` job only
    rank 0 writes (its own loss, as ``StatsHandler`` shows).

    Args:
        filename: the CSV file; missing parent folders are created.
        output_transform: gets the loss from ``engine.state.output``; default: ``output["loss"]``.
    """

    def __init__(self, filename: str | os.PathLike, output_transform: Callable[[Any], Any] = _default_loss) -> None:
        self.filename = Path(filename)
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        if loss is None or _rank() != 0:
            return
        value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
        self.filename.parent.mkdir(parents=True, exist_ok=True)
        new = not self.filename.is_file()
        with open(self.filename, "a", encoding="utf-8") as stream:
            if new:
                stream.write("epoch,iteration,loss\n")
            stream.write(f"{engine.state.epoch},{engine.state.iteration},{value!r}\n")


# ----------------------------------------------------------------------------------------------------------------
# data checks
# ----------------------------------------------------------------------------------------------------------------


def _item_problem(item: Mapping[str, Any], verify: bool) -> PairProblem | None:
    image, label = item.get("image"), item.get("label")
    if not isinstance(image, (str, os.PathLike)) or not isinstance(label, (str, os.PathLike)):
        files = [f for key in ("image", "label") for f in (item[key] if isinstance(item[key], list) else [item[key]])]
        absent = [str(f) for f in files if not Path(f).exists()]
        return PairProblem("missing file", ", ".join(absent) + " not found") if absent else None
    problem = check_image_label_pair(image, label, verify=verify)
    if problem is not None:
        return problem
    try:
        size = read_spatial_size(image, verify=False)
    except UnreadableImageError as err:  # pragma: no cover - read just before
        return PairProblem("unreadable image", str(err))
    if len(size) > 2:
        return PairProblem(
            "3-D volume",
            f"{image} is a volume of size {'x'.join(map(str, size))}; a 2-D image is expected (slice volumes first)",
        )
    return None


def _common_keys(items: list[dict], source: str) -> list[dict]:
    """Keep the keys every item has: batching items with different keys fails with a bare ``KeyError``."""
    if not items:
        return items
    common = set(items[0]).intersection(*items[1:])
    extra = Counter(key for item in items for key in item if key not in common)
    if not extra:
        return items
    detail = ", ".join(f"{key!r} (in {count} of {len(items)} items)" for key, count in sorted(extra.items()))
    logger.info("%s: keys that only some items have are not used: %s", source, detail)
    return [{k: v for k, v in item.items() if k in common} for item in items]


def load_checked_datalist(
    path: str | os.PathLike,
    split: str = "training",
    check_files: bool = True,
    skip_bad_items: bool = False,
    verify: bool = True,
    num_workers: int | None = None,
    base_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Load a datalist split and check its files before training starts.

    The datalist is read with :py:func:`himix_monai.data.datalist.load_datalist` (errors name the file, the split
    and the item: invalid JSON, missing keys, empty text). Then every item's image and mask are checked:
    present, readable (decoded when ``verify``, so truncated or corrupt PNG/JPEG/DICOM files and DICOM files
    without pixel data are found), of the same spatial size, and 2-D. Bad items either stop the run with one
    :py:class:`~himix_monai.data.datalist.DatalistError` that counts them by reason and lists the first few
    (file, item number, file names), or, with ``skip_bad_items``, are logged, counted and left out.

    Keys that only some items have (e.g. ``image_dicom`` in the demo items but not in items added by hand)
    are dropped, with one log line: batching items with different keys would fail with a bare ``KeyError``.

    Args:
        path: the datalist JSON file.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        check_files: check the files; False only loads the datalist. Booleans given as text (``"false"``) are
            read as such, see :py:func:`as_bool`.
        skip_bad_items: leave bad items out (with a warning each and a summary) instead of stopping.
        verify: decode the files to find truncated or corrupt ones; False reads the headers only.
        num_workers: threads for the checks; default ``min(8, cpu count)``.
        base_dir: the folder relative paths are resolved against (default: the datalist's folder).

    Returns:
        The split's usable items.

    Raises:
        DatalistError: for an invalid datalist, for bad items unless ``skip_bad_items``, and when no item of a
            non-empty split is usable.
    """
    items = _common_keys(load_datalist(path, split=split, base_dir=base_dir), f"{path} ({split!r})")
    skip_bad_items = as_bool(skip_bad_items, "skip_bad_items")
    if not as_bool(check_files, "check_files") or not items:
        return items
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="datalist-check") as executor:
            problems = list(executor.map(lambda item: _item_problem(item, verify), items))
    else:
        problems = [_item_problem(item, verify) for item in items]
    bad = [(number, problem) for number, problem in enumerate(problems, start=1) if problem is not None]
    if not bad:
        return items
    counts = Counter(problem.reason for _, problem in bad)
    summary = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
    where = f"{path}: {len(bad)} of {len(items)} {split!r} items"
    if not skip_bad_items:
        listed = [f"  item {number}: {problem.reason}: {problem.detail}" for number, problem in bad[:_MAX_LISTED_ITEMS]]
        if len(bad) > _MAX_LISTED_ITEMS:
            listed.append(f"  ... ({len(bad) - _MAX_LISTED_ITEMS} more)")
        raise DatalistError(
            f"{where} cannot be used ({summary}):\n"
            + "\n".join(listed)
            + "\nFix or remove them (the data_prep converters skip such items), or set skip_bad_items to true to "
            "train without them."
        )
    for number, problem in bad:
        logger.warning("%s: skipped item %d of %r: %s: %s", path, number, split, problem.reason, problem.detail)
    if len(bad) == len(items):
        raise DatalistError(f"{where} cannot be used ({summary}): no usable item left.")
    logger.warning("%s are skipped (%s); %d are used.", where, summary, len(items) - len(bad))
    return [item for item, problem in zip(items, problems) if problem is None]


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
