"""
Checkpoint files of the HiMix bundle: the file format, atomic writing, safe loading and readable reports.

This module knows files and state dicts only; the ignite handlers that save and load during a run
(``AtomicCheckpointSaver``, ``SafeCheckpointLoader``, ``TrainingStateCheckpoint``) are in
:py:mod:`himix_monai.handlers` and are built on these functions.

- :py:func:`save_checkpoint_atomically` writes a checkpoint so that a crash or a kill never leaves a
  half-written file;
- :py:func:`load_checkpoint_file` loads with ``torch.load(..., weights_only=True)`` and clear errors;
- :py:func:`check_and_load_network` and :py:func:`load_network_weights` compare a checkpoint with a network
  before anything is loaded, in this order: the recorded settings (:py:func:`check_settings_record`: every
  differing setting named with both values and the command-line override that fixes it), the text encoder's
  fingerprint, the keys and shapes (:py:func:`describe_state_mismatch`) and, for training states, the
  :py:func:`network_signature`; each raises one readable :py:class:`CheckpointMismatchError`.

The settings record: a :py:class:`~himix_monai.networks.HiMix` state dict (``models/model.pt``, and the
``network`` entry of ``models/checkpoint_latest.pt``) holds, under :py:data:`SETTINGS_KEY`, the network's
constructor arguments and the preprocessing settings it was trained with (``image_size``, ``intensity_range``,
...). Inside the state dict rather than beside it, so that ``model.pt`` stays a plain state dict that MONAI
Label, ``monai.bundle ckpt_export`` (the model zoo's check) and ``load_state_dict(strict=True)`` load as they
are, and the record travels with the file wherever it is copied.

Why check and not build the network from the record: ``inference.json`` must stay a complete config that MONAI
Label, the model zoo's checks and ``ckpt_export`` instantiate without a checkpoint (and ``%file#key`` macros that
could share ``train.json``'s settings resolve from the working directory, which differs between the repository
root and ``bundle/``); a config that silently took its settings from whichever file is at ``models/model.pt``
would also hide a wrong file or a wrong command. So the configs keep their settings, the model file records the
trained ones, and a difference stops the run before any weight is loaded with a message that says what to add.

All checkpoints written here hold plain state dicts (tensors, numbers, strings, lists, dicts) only, so they
load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from himix_monai.files import atomic_path
from himix_monai.config_utils import unwrap_network
from himix_monai.errors import HiMixError
from himix_monai.networks.blocks.text_encoder import FrozenTextEncoder, TextEncoderMismatchError

__all__ = [
    "META_KEY",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointMismatchError",
    "save_checkpoint_atomically",
    "load_checkpoint_file",
    "network_signature",
    "SETTINGS_KEY",
    "CheckpointSettingsError",
    "setting_override",
    "describe_settings_mismatch",
    "check_settings_record",
    "describe_state_mismatch",
    "load_network_weights",
    "strip_module_prefix",
    "network_state_from_checkpoint",
    "check_and_load_network",
]

_MAX_LISTED = 5  # mismatched keys of each kind shown in an error message
META_KEY = "meta"
"""Entry of a training-state checkpoint that holds its metadata (format, network signature, frozen weights)."""
CHECKPOINT_FORMAT = 1
"""Version of the training-state checkpoint layout written under :py:data:`META_KEY`."""
_STATE_DICT_KEYS = ("model", "network", "net", "state_dict")
SETTINGS_KEY = "_extra_state"
"""Entry of a HiMix state dict that records the network's constructor and preprocessing settings
(:py:meth:`himix_monai.networks.HiMix.get_extra_state`)."""
NOT_COMPARED = (
    "pretrained",
    "image_encoder_checkpoint",
    "text_encoder",
    "text_cache_size",
    "text_encoder_dtype",
    "gradient_checkpointing",
    "dropout",
)
"""Recorded network settings that are not compared: initialisation only (``pretrained``,
``image_encoder_checkpoint``), run-time only (cache, storage dtype, gradient checkpointing, Monte-Carlo dropout) or compared otherwise
(``text_encoder``: a path differs between machines; its fingerprint is compared, and ``use_text`` is)."""
BUNDLE_OPTIONS = {
    "in_channels": "in_channels",
    "image_encoder": "image_encoder",
    "text_length": "max_text_length",
    "layer_grouping": "layer_grouping",
    "removed_layer_group": "removed_layer_group",
    "use_asrm": "use_asrm",
}
"""The bundle's command-line option of each network argument that is a top-level setting of its configs; any
other argument is set with ``--network_def#<argument>``. Preprocessing settings are top-level settings."""

logger = logging.getLogger(__name__)


class CheckpointError(HiMixError, RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe to load or not of the expected layout."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the network (other keys, shapes or settings); the message lists the differences."""


class CheckpointSettingsError(CheckpointMismatchError):
    """The settings recorded in a checkpoint differ from the network's; the message names each one, both values
    and the command-line override that gives the recorded value."""


# ----------------------------------------------------------------------------------------------------------------
# writing and reading checkpoint files
# ----------------------------------------------------------------------------------------------------------------


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
    with atomic_path(path) as temp, open(temp, "wb") as stream:
        torch.save(obj, stream)
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


def network_signature(network: torch.nn.Module) -> dict[str, Any]:
    """Settings of a network that change its results but not its weight shapes.

    Today: the class name and the number of heads of every attention module (``num_heads`` does not change the
    shapes of the attention weights, so a checkpoint of another ``num_heads`` would load silently).

    Args:
        network: the network (``DataParallel`` wrappers are unwrapped).

    Returns:
        ``{"class": "HiMix", "num_heads": {"stages.0.self_attention": 8, ...}}``.
    """
    network = unwrap_network(network)
    heads = {
        name: int(module.num_heads)
        for name, module in network.named_modules()
        if name and isinstance(getattr(module, "num_heads", None), int)
    }
    return {"class": type(network).__name__, "num_heads": heads}


def _check_text_encoders(
    network: torch.nn.Module, state: dict[str, Any], source: str, frozen: Mapping[str, Any] | None = None
) -> None:
    """Check the fingerprint of every frozen text encoder in ``state``, in place, before anything is loaded.

    The checks are those of :py:meth:`FrozenTextEncoder.check_state` (a state dict that still holds an encoder's
    weights, as ``model.pt`` files written before the encoder was left out do, is compared and updated). A
    training-state checkpoint of that time holds neither the encoder nor its fingerprint but a record
    ``frozen`` (``{"keys": [...], "fingerprint": sum of absolute values}``): the sum is compared with a relative
    tolerance of 1e-3 (it was taken in the encoder's storage dtype) and the fingerprint is added.
    """
    for name, module in unwrap_network(network).named_modules():
        if not isinstance(module, FrozenTextEncoder):
            continue
        prefix = f"{name}." if name else ""
        extra = prefix + "_extra_state"
        if frozen is not None and extra not in state and not any(k.startswith(prefix + "model.") for k in state):
            with torch.no_grad():
                now = float(sum(float(p.detach().double().abs().sum()) for p in module.model.parameters()))
            saved = float(frozen.get("fingerprint", 0.0))
            if not math.isclose(saved, now, rel_tol=1e-3):
                raise CheckpointMismatchError(
                    f"{source} was trained with another text encoder (checksum of its frozen weights {saved:.6g}, "
                    f"this network's {module.fingerprint['text_encoder']!r}: {now:.6g}). Use the text encoder it "
                    "was trained with to resume."
                )
            state[extra] = module.get_extra_state()
        try:
            module.check_state(state, prefix, source)
        except TextEncoderMismatchError as err:
            raise CheckpointMismatchError(str(err)) from err


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


def strip_module_prefix(state: Mapping[str, Any], prefix: str = "module.") -> Mapping[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return OrderedDict((k[len(prefix) :], v) for k, v in state.items())
    return state


def setting_override(option: str, value: Any) -> str:
    """The ``python -m monai.bundle run`` option that sets ``option`` to ``value``.

    Args:
        option: the config id, e.g. ``"image_size"`` or ``"network_def#num_heads"``.
        value: a JSON value.

    Examples::

        setting_override("image_size", [64, 64])  # '--image_size "[64,64]"'
        setting_override("use_asrm", False)       # '--use_asrm false'
    """
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "None"
    elif isinstance(value, (list, dict)):
        text = '"' + json.dumps(value, separators=(",", ":")).replace('"', "'") + '"'
    else:
        text = str(value)
        text = f'"{text}"' if any(c.isspace() for c in text) else text
    return f"--{option} {text}"


def _comparable(record: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """``{name: (command-line option, value)}`` of a settings record, for comparison."""
    network = dict(record.get("network") or {})
    out = {
        name: (BUNDLE_OPTIONS.get(name, f"network_def#{name}"), value)
        for name, value in network.items()
        if name not in NOT_COMPARED
    }
    if "text_encoder" in network:
        out["use_text"] = ("use_text", network["text_encoder"] is not None)
    out.update({name: (name, value) for name, value in dict(record.get("preprocessing") or {}).items()})
    return out


def _same(a: Any, b: Any) -> bool:
    if (
        isinstance(a, (int, float))
        and isinstance(b, (int, float))
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def describe_settings_mismatch(
    recorded: Mapping[str, Any], current: Mapping[str, Any], source: str = "the checkpoint"
) -> str | None:
    """Compare a checkpoint's settings record with the network's own, naming every difference.

    Settings present in only one of the records (e.g. an argument added to the network later) are not compared;
    neither are those of :py:data:`NOT_COMPARED`.

    Args:
        recorded: the record found in the checkpoint (``{"network": {...}, "preprocessing": {...}}``).
        current: the record of the network it is loaded into (built from this run's config).
        source: how to name the checkpoint in the message.

    Returns:
        None when every shared setting is equal, else a report: one line per setting with both values and the
        command-line override that gives the checkpoint's value, then all overrides on one line.
    """
    saved, now = _comparable(recorded), _comparable(current)
    differing = [name for name in saved if name in now and not _same(saved[name][1], now[name][1])]
    if not differing:
        return None
    overrides = [setting_override(saved[name][0], saved[name][1]) for name in differing]
    lines = [
        f"{source} was trained with other settings than this run's config: {len(differing)} differ "
        "(in the checkpoint -> in this config):"
    ]
    lines += [
        f"  {name}: {json.dumps(saved[name][1])} -> {json.dumps(now[name][1])}  (fix: {override})"
        for name, override in zip(differing, overrides)
    ]
    lines.append(
        "Run with the settings the model was trained with (the same dataset preset and overrides), e.g. add: "
        + " ".join(overrides)
    )
    return "\n".join(lines)


def check_settings_record(network: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Compare the settings recorded in ``state`` with ``network``'s own, before anything is loaded.

    For networks that record their settings (:py:class:`~himix_monai.networks.HiMix`: ``settings_record()`` and
    ``decode_settings()``, the record under :py:data:`SETTINGS_KEY`). A state dict saved before settings were
    recorded (no entry, or an empty record) is completed in place with an empty record and loads with a warning.

    Args:
        network: the network (wrappers are unwrapped).
        state: the state dict to load (modified in place for an old one).
        source: the file, for the messages.

    Raises:
        CheckpointSettingsError: naming every differing setting, both values and the override that fixes it.
    """
    network = unwrap_network(network)
    if not (hasattr(network, "settings_record") and hasattr(network, "decode_settings")):
        return
    recorded = network.decode_settings(state.get(SETTINGS_KEY))
    if not recorded:
        own = network.state_dict().get(SETTINGS_KEY)
        if isinstance(own, torch.Tensor):
            state[SETTINGS_KEY] = torch.zeros_like(own)
        logger.warning(
            f"{source} records no network or preprocessing settings (saved before they were recorded): they are "
            "not checked; make sure this config's settings (image_size, intensity_range, in_channels, "
            "max_text_length, text_encoder, use_text, ...) are those it was trained with."
        )
        return
    report = describe_settings_mismatch(recorded, network.settings_record(), source)
    if report is not None:
        raise CheckpointSettingsError(report)


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
    first = next((k for k, v in expected.items() if _shape(v) is not None and len(_shape(v)) > 1), None)
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


def network_state_from_checkpoint(checkpoint: Any, key: str | None, source: str) -> Mapping[str, Any]:
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
    return strip_module_prefix(state)


def check_and_load_network(
    network: torch.nn.Module,
    state: Mapping[str, Any],
    source: str,
    signature: Mapping[str, Any] | None = None,
    frozen: Mapping[str, Any] | None = None,
    target: str | None = None,
) -> None:
    """Compare ``state`` with ``network`` and load it; every mismatch is reported by name before anything loads.

    Args:
        network: the network (a ``DataParallel``/DDP wrapper is unwrapped).
        state: its state dict as saved.
        source: the file the state comes from, for the messages.
        signature: the saved :py:func:`network_signature`, compared when given.
        frozen: the frozen-weight record of training states written before the text encoder was left out of
            the state dict (see :py:func:`_check_text_encoders`).
        target: the name of the network in the messages (its class name by default).

    Raises:
        CheckpointSettingsError: the recorded settings differ (checked first, see :py:func:`check_settings_record`).
        CheckpointMismatchError: listing the missing, unexpected and reshaped entries or signature differences.
    """
    network = unwrap_network(network)
    state = OrderedDict(state)
    check_settings_record(network, state, source)
    _check_text_encoders(network, state, source, frozen)
    expected = network.state_dict()
    report = describe_state_mismatch(expected, state, source=source, target=target or type(network).__name__)
    if report is not None:
        raise CheckpointMismatchError(report)
    if signature is not None:
        report = _describe_signature_mismatch(network_signature(network), signature, source)
        if report is not None:
            raise CheckpointMismatchError(report)
    network.load_state_dict(state, strict=True)


def load_network_weights(
    network: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu", key: str | None = None
) -> torch.nn.Module:
    """Load network weights from a checkpoint safely, with one readable error when they do not fit.

    The file is loaded with ``weights_only=True``. It may be a plain state dict (``models/model.pt``) or a
    dict with the state dict under ``key`` (default: the first of ``model``, ``network``, ``net``,
    ``state_dict`` that holds one, e.g. ``models/checkpoint_latest.pt``). A ``module.`` prefix left by
    ``DataParallel`` is removed. Before loading, the settings recorded in the state dict are compared with the
    network's (:py:func:`check_settings_record`), then keys and shapes; a training state's
    :py:func:`network_signature` (:py:class:`~himix_monai.handlers.TrainingStateCheckpoint` records it) is
    compared as well. The fingerprint of a frozen text encoder (``text_encoder._extra_state``) must be that of the
    network's encoder; a ``model.pt`` that still holds the encoder's weights loads after they are compared and
    dropped (:py:meth:`~himix_monai.networks.blocks.FrozenTextEncoder.check_state`).

    Args:
        network: the network to load into (``DataParallel`` wrappers are unwrapped).
        path: the checkpoint file.
        map_location: passed to ``torch.load``.
        key: the checkpoint entry that holds the network state dict; None to detect it.

    Returns:
        ``network``, with the weights loaded.

    Raises:
        CheckpointError: the file is missing, unreadable or unsafe, or holds no network state dict.
        CheckpointSettingsError: the recorded settings differ; every one is named with both values and its
            command-line override.
        CheckpointMismatchError: the keys, shapes or signature differ; the message gives counts, the first few
            keys with both shapes, the network parts concerned and a hint.

    Examples::

        net = HiMix(in_channels=1, image_encoder="convnext_tiny", text_encoder=minilm_path)
        load_network_weights(net, "bundle/models/model.pt")
    """
    checkpoint = load_checkpoint_file(path, map_location=map_location)
    state = network_state_from_checkpoint(checkpoint, key, str(path))
    signature = frozen = None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(META_KEY), Mapping):
        signature = checkpoint[META_KEY].get("network_signature")
        frozen = checkpoint[META_KEY].get("frozen_weights")
    check_and_load_network(network, state, str(path), signature, frozen)
    return network
