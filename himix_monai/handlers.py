"""
Ignite handlers of the HiMix bundle: checkpoints, training state, loud failures, loss logging and per-image metrics.

Checkpoints (the file format, atomic writing and the checks are in :py:mod:`himix_monai.checkpoints`):

- :py:class:`SafeCheckpointLoader` is MONAI's ``CheckpointLoader`` with ``weights_only=True`` and one readable
  error (recorded settings, text encoder, keys and shapes) before anything is loaded;
- :py:class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` with atomic writes (MONAI's own writes in
  place and deletes the previous best model before writing the new one).

Training (the MONAI ``SupervisedTrainer`` runs the loop; these add what a long run on real data needs):

- :py:class:`TrainingStateCheckpoint` saves the latest full training state (network, optimizer, lr scheduler,
  trainer epoch/iteration, early-stopping counter, the evaluator's best metric and the best-model saver's
  record) to one file at every epoch end and every N iterations, atomically, and resumes from it (the file
  functions are in :py:mod:`himix_monai.checkpoints`);
- :py:class:`StopOnNonFiniteLoss` stops training with :py:class:`NonFiniteLossError` (epoch, iteration, loss)
  instead of ignite's silent ``TerminateOnNan``;
- :py:class:`LossCSVWriter` logs every iteration's loss to a CSV file (full precision, for plots and
  reproducibility checks).

Evaluation:

- :py:class:`SegmentationMetricsSaver` is MONAI's ``MetricsSaver`` writing the bundle's ``per_image_metrics.csv``
  (file names, Dice, IoU) and ``summary.json`` (mean ± std, global Dice/IoU; scores as defined in
  :py:mod:`himix_monai.metrics`).

CT volume masks are written by MONAI's ``SaveImaged`` (``bundle/configs/inference.json``, ``volume`` section).

The overlay handler is in :py:mod:`himix_monai.visualize`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from monai.config import PathLike
from monai.data import decollate_batch
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler, MetricsSaver
from monai.networks.utils import copy_model_state
from monai.utils import CommonKeys, IgniteInfo, min_version, optional_import, string_list_all_gather

from himix_monai.checkpoints import (
    CHECKPOINT_FORMAT,
    META_KEY,
    CheckpointError,
    check_and_load_network,
    load_checkpoint_file,
    network_signature,
    network_state_from_checkpoint,
    save_checkpoint_atomically,
    strip_module_prefix,
)
from himix_monai.config_utils import as_bool, unwrap_network
from himix_monai.errors import HiMixError, OutOfSpaceError
from himix_monai.files import is_out_of_space, out_of_space_error, write_text_atomically
from himix_monai.metrics import SCORE_KEYS, summarize_scores
from himix_monai.transforms.mask import meta_filename

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite", IgniteInfo.OPT_IMPORT_VERSION, min_version, "distributed")
Checkpoint, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Checkpoint")
BaseSaveHandler, _ = optional_import(
    "ignite.handlers.checkpoint", IgniteInfo.OPT_IMPORT_VERSION, min_version, "BaseSaveHandler"
)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "NonFiniteLossError",
    "SafeCheckpointLoader",
    "AtomicCheckpointSaver",
    "TrainingStateCheckpoint",
    "StopOnNonFiniteLoss",
    "LossCSVWriter",
    "SegmentationMetricsSaver",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(HiMixError, RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and the iteration."""


# ----------------------------------------------------------------------------------------------------------------
# checkpoint loading and atomic best-model saving
# ----------------------------------------------------------------------------------------------------------------


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI ``CheckpointLoader`` that loads with ``weights_only=True`` and reports configuration mismatches.

    A drop-in replacement (same arguments). Every ``torch.nn.Module`` in ``load_dict`` is compared with its
    checkpoint entry before anything is loaded (:py:func:`~himix_monai.checkpoints.check_and_load_network`): with
    ``strict=True`` and ``strict_shape=True`` (the defaults) a checkpoint of another configuration raises one
    ``CheckpointMismatchError`` instead of PyTorch's list of every missing key: first
    ``CheckpointSettingsError`` when the settings recorded in the file differ from the network's (each one named
    with both values and the command-line override that fixes it; a file without the record loads with a
    warning), then the text encoder's fingerprint, then keys and shapes (counts, the first few keys with shapes, a
    hint). A missing, truncated or unsafe file raises ``CheckpointError`` naming it.

    Args:
        load_path: the checkpoint file.
        load_dict: the objects to load, e.g. ``{"model": network}``; a single network entry also loads a
            checkpoint that is directly its state dict (``models/model.pt``) or that holds it under ``model``,
            ``network``, ``net`` or ``state_dict`` (``models/checkpoint_latest.pt``, whose recorded settings and
            text-encoder fingerprint are checked too).
        name: logger name; None uses the engine's logger.
        map_location: passed to ``torch.load``.
        strict: require the same keys (see ``CheckpointLoader``).
        strict_shape: require the same shapes; False loads the matching weights only and skips non-network
            objects (transfer learning, see ``CheckpointLoader``).

    Examples::

        {
            "_target_": "himix_monai.handlers.SafeCheckpointLoader",
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
        meta = checkpoint.get(META_KEY) if isinstance(checkpoint, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        first_key, first = next(iter(self.load_dict.items()))
        if len(self.load_dict) == 1 and (not isinstance(checkpoint, Mapping) or first_key not in checkpoint):
            if isinstance(first, torch.nn.Module):  # a plain state dict, or one under "model", "network", ...
                checkpoint = {first_key: network_state_from_checkpoint(checkpoint, None, source)}
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
            state = strip_module_prefix(checkpoint[k]) if isinstance(checkpoint[k], Mapping) else checkpoint[k]
            if not self.strict_shape:
                checkpoint[k] = copy_model_state(unwrap_network(obj), state, inplace=False)[0]
            elif self.strict:  # compare keys, shapes and recorded settings, then load
                target = f"{k!r} ({type(unwrap_network(obj)).__name__})"
                check_and_load_network(
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


class _AtomicDiskSaver(BaseSaveHandler):
    """ignite save handler: atomic writes with normal permissions, on rank 0 only (as ignite's ``DiskSaver``); an
    optional fixed file name."""

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _rank() == 0:
            save_checkpoint_atomically(checkpoint, self.dirname / (self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is not None or _rank() != 0:
            return  # a fixed file is replaced atomically by the next save; deleting it first would risk losing it
        (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically.

    MONAI's ``CheckpointSaver`` writes with ignite's ``DiskSaver(atomic=False)`` (for group-readable files),
    and with a fixed ``key_metric_filename`` it deletes the previous best model before writing the new one: a
    kill in between leaves no ``model.pt`` or a truncated one. This subclass writes every file through
    :py:func:`save_checkpoint_atomically` (temporary file, fsync, ``os.replace``, the usual permissions) and
    overwrites a fixed file name in place instead of deleting it first. In a ``torch.distributed`` job attach it on
    every rank (its record of the best score stays the same everywhere): only rank 0 writes. Arguments and file
    names are those of ``CheckpointSaver``.

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
        return unwrap_network(obj).state_dict()
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
    """Names of the floating state-dict tensors that hold NaN or inf; one host sync for the whole network."""
    floating = [
        (n, v) for n, v in unwrap_network(network).state_dict().items() if torch.is_tensor(v) and v.is_floating_point()
    ]
    if not floating:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in floating]).cpu()  # the one sync
    return [name for (name, _), ok in zip(floating, finite.tolist()) if not ok]


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
    network's settings, the last loss, the time), written with
    :py:func:`~himix_monai.checkpoints.save_checkpoint_atomically`, so a kill never leaves a broken file, and
    loadable with ``torch.load(..., weights_only=True)``.

    What is saved per kind of object in ``save_dict``:

    - ``torch.nn.Module`` (the first one; one network per checkpoint): its ``state_dict()`` (unwrapped from
      ``DataParallel``/``DDP``); HiMix's state dict leaves the frozen text encoder out and records its
      fingerprint, checked when resuming (see :py:class:`~himix_monai.networks.blocks.FrozenTextEncoder`);
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
    and settings, see :py:func:`~himix_monai.checkpoints.load_network_weights`), then everything else is
    restored and the trainer continues from the saved iteration (mid-epoch too: the rest of that epoch is run)
    up to the configured number of epochs, so a resumed run ends with as many epochs as an uninterrupted one.
    Without a file it logs that and starts fresh. A run that had finished (e.g. stopped early) is not continued.

    Args:
        save_path: the checkpoint file, e.g. ``models/checkpoint_latest.pt``.
        save_dict: the objects to save and restore by name, e.g.
            ``{"network": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer,
            "early_stopping": early_stop_handler, "evaluator": evaluator, "best_model_saver": saver}``.
            It must contain the trainer engine that the handler is attached to (under any name).
        every_n_iterations: also save every N iterations within an epoch; 0 saves at epoch ends only.
        resume: load ``save_path`` when the trainer starts, if it exists (text such as ``"false"`` is read as a
            boolean, see :py:func:`~himix_monai.config_utils.as_bool`).
        map_location: passed to ``torch.load`` when resuming.
        name: logger name; None uses the trainer's logger.

    Examples::

        "checkpoint_saver": {
            "_target_": "himix_monai.handlers.TrainingStateCheckpoint",
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
        map_location: Any = "cpu",
        name: str | None = None,
    ) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save.")
        if META_KEY in save_dict:
            raise ValueError(f"{META_KEY!r} is reserved for the checkpoint's metadata; rename that save_dict entry.")
        if int(every_n_iterations) < 0:
            raise ValueError(f"every_n_iterations must be 0 (epoch ends only) or positive, got {every_n_iterations}.")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.every_n_iterations = int(every_n_iterations)
        self.resume = as_bool(resume, "resume")
        self.map_location = map_location
        self._name = name
        self.logger = logging.getLogger(name)
        self.last_saved_iteration: int | None = None

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
        signature = None
        for key, obj in self.save_dict.items():
            if obj is None:  # e.g. a handler disabled on this rank
                content[key] = None
            else:
                if isinstance(obj, torch.nn.Module) and signature is None:
                    signature = network_signature(obj)
                content[key] = _state_of(obj)
        loss = _loss_of(engine.state.output)
        content[META_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "epoch_length": int(engine.state.epoch_length or 0),
            "max_epochs": int(engine.state.max_epochs or 0),
            "finished": bool(finished),
            "loss": None if loss is None else float(loss),
            "network_signature": signature,
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
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(META_KEY), Mapping):
            raise CheckpointError(f"{source}: not a training-state checkpoint (no {META_KEY!r} entry).")
        meta = checkpoint[META_KEY]
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise CheckpointError(
                f"{source}: no saved state for {missing} (saved: {[k for k in checkpoint if k != META_KEY]}); "
                "delete it, or set resume to false, to start fresh."
            )
        # the network first: a checkpoint of another configuration must fail before anything is changed
        networks = [k for k, obj in self.save_dict.items() if isinstance(obj, torch.nn.Module)][:1]
        for key in networks:
            check_and_load_network(
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

    The file is created (atomically) with a header when missing and appended to otherwise, so a resumed run
    continues it; a symbolic link in its place is replaced by a file, never written through. At
    its first iteration the run drops the rows of that iteration and later ones (written by a run that was killed
    after its last checkpoint, or by an earlier run in the folder), so that every iteration is in the file once:
    a run resumed at iteration N keeps rows 1..N, a fresh run starts a new file. In a ``torch.distributed`` job
    only rank 0 writes (its own loss, as ``StatsHandler`` shows).

    Args:
        filename: the CSV file; missing parent folders are created.
        output_transform: gets the loss from ``engine.state.output``; default: ``output["loss"]``.
    """

    def __init__(self, filename: str | os.PathLike, output_transform: Callable[[Any], Any] = _default_loss) -> None:
        self.filename = Path(filename)
        self.output_transform = output_transform
        self._started = False

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
        if not self._started:
            self._started = True
            self._drop_rows_from(int(engine.state.iteration))
        row = f"{engine.state.epoch},{engine.state.iteration},{value!r}\n"
        try:
            if self.filename.is_file():
                descriptor = os.open(self.filename, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
                with os.fdopen(descriptor, "a", encoding="utf-8") as stream:
                    stream.write(row)
            else:
                write_text_atomically(self.filename, "epoch,iteration,loss\n" + row)
        except OutOfSpaceError:
            raise
        except OSError as error:
            if is_out_of_space(error, self.filename.parent):
                outcome = f"The loss of iteration {engine.state.iteration} is missing or cut short at its end."
                raise out_of_space_error(self.filename, outcome) from error
            raise

    def _drop_rows_from(self, iteration: int) -> None:
        """Rewrite the file (atomically) without the rows of ``iteration`` and later ones."""
        if not self.filename.is_file():
            return
        lines = self.filename.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = lines[:1]
        for line in lines[1:]:
            fields = line.split(",")
            if len(fields) >= 3 and fields[1].strip().isdigit() and int(fields[1]) < iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) == len(lines) and not self.filename.is_symlink():
            return
        write_text_atomically(self.filename, "".join(kept))  # also replaces a link by a file of its own
        logger.info(f"{self.filename}: dropped {len(lines) - len(kept)} rows from iteration {iteration} on.")



# ----------------------------------------------------------------------------------------------------------------
# per-image metrics
# ----------------------------------------------------------------------------------------------------------------


def _image_meta(image_key: str) -> Callable[[Any], list[dict[str, Any]]]:
    """``MetricsSaver``'s ``batch_transform``: the file name of every item's image (MetaTensor meta or
    ``<key>_meta_dict``), from the decollated ``engine.state.batch``."""

    def transform(batch: Any) -> list[dict[str, Any]]:
        items = list(decollate_batch(batch, detach=True)) if isinstance(batch, Mapping) else list(batch or [])
        return [
            {"filename_or_obj": meta_filename(item, image_key) if isinstance(item, Mapping) else None} for item in items
        ]

    return transform


class SegmentationMetricsSaver(MetricsSaver):
    """
    MONAI ``MetricsSaver`` that writes the bundle's evaluation files: per-image Dice/IoU with file names, their
    mean ± std and the global Dice/IoU.

    ``MetricsSaver`` collects the image file names at every iteration (``batch_transform``), gathers them across
    ranks and writes on ``save_rank`` only; this subclass keeps all of that and replaces the writing, for what
    ``MetricsSaver`` lacks: its files are ``metrics.csv`` / ``<metric>_raw.csv`` / ``<metric>_summary.csv``, one
    per metric, written in place with 4 decimals, and its summary has no global scores. At ``EPOCH_COMPLETED``
    (after the metrics, which the engine attaches before its handlers) this one writes, atomically:

    - ``<save_dir>/<csv_filename>``: columns ``image,dice,iou``, one row per image (6 decimals; multi-channel
      scores averaged over channels);
    - ``<save_dir>/<summary_filename>``: ``n_images``, ``n_scored`` (rows whose Dice, else IoU, entered the
      mean), ``dice_mean``, ``dice_std``, ``iou_mean``, ``iou_std`` (population std), ``global_dice``,
      ``global_iou``: the definitions of :py:mod:`himix_monai.metrics`; with ``original_metrics`` also
      ``"resolution": "network"`` and an ``"original_resolution"`` object with the same keys, whose per-image
      scores go to ``<original_csv_filename>``;

    and logs one line per resolution: ``Dice mean ± std, IoU mean ± std (over N images); global Dice, global
    IoU``. Rows scored NaN (a metric with ``ignore_empty=True``) are written as ``nan``, left out of mean and std
    and named in a warning. The summary is kept in ``self.summary``.

    Args:
        save_dir: folder of the files (created).
        dice_metric: the engine's per-image Dice metric (``save_details=True``); None leaves it out.
        iou_metric: the engine's per-image IoU metric; None leaves it out.
        global_dice_metric: the engine's global Dice (``ConfusionMatrix("f1 score", reduction="sum")``); None
            leaves it out.
        global_iou_metric: the engine's global IoU (``ConfusionMatrix("threat score", reduction="sum")``); None
            leaves it out.
        image_key: key of the image in the batch items (source of the file names).
        csv_filename: name of the per-image CSV.
        summary_filename: name of the summary JSON.
        save_rank: rank that writes the files.
        original_metrics: the same four metrics at the images' original resolution (the prediction inverted to
            the input's size, against the label as loaded), under the keys ``dice``, ``iou``, ``global_dice``,
            ``global_iou``.
        original_csv_filename: name of the per-image CSV at the original resolution.

    Examples::

        from himix_monai.metrics import segmentation_metrics

        metrics = segmentation_metrics()
        evaluator = SupervisedEvaluator(
            ...,
            key_val_metric={"val_mean_dice": metrics.pop("val_mean_dice")},
            additional_metrics=metrics,
            val_handlers=[SegmentationMetricsSaver("eval")],
        )
        evaluator.run()  # eval/per_image_metrics.csv, eval/summary.json
    """

    def __init__(
        self,
        save_dir: PathLike,
        dice_metric: str | None = "val_mean_dice",
        iou_metric: str | None = "val_mean_iou",
        global_dice_metric: str | None = "val_global_dice",
        global_iou_metric: str | None = "val_global_iou",
        image_key: str = "image",
        csv_filename: str = "per_image_metrics.csv",
        summary_filename: str = "summary.json",
        save_rank: int = 0,
        original_metrics: Mapping[str, str] | None = None,
        original_csv_filename: str = "per_image_metrics_original_resolution.csv",
    ) -> None:
        unknown = sorted(set(original_metrics or {}) - set(SCORE_KEYS))
        if unknown:
            raise ValueError(f"original_metrics: unknown keys {unknown}; use {', '.join(SCORE_KEYS)}.")
        self.scores = dict(zip(SCORE_KEYS, (dice_metric, iou_metric, global_dice_metric, global_iou_metric)))
        self.original_metrics = dict(original_metrics or {})
        names = [n for n in [*self.scores.values(), *self.original_metrics.values()] if n is not None]
        super().__init__(
            save_dir=os.fspath(save_dir),
            metrics=names,
            metric_details=names,
            batch_transform=_image_meta(image_key),
            save_rank=save_rank,
        )
        self.csv_filename = csv_filename
        self.summary_filename = summary_filename
        self.original_csv_filename = original_csv_filename
        self.summary: dict[str, Any] = {}

    def _scores(self, engine: Engine, metrics: Mapping[str, str | None], names: list[str]) -> tuple[dict, list[str]]:
        try:
            scores = summarize_scores(engine, metrics)
        except KeyError as err:
            raise KeyError(f"SegmentationMetricsSaver: {err.args[0]}") from err
        if scores["per_image"] and len(names) != scores["n_images"]:
            logger.warning(
                "SegmentationMetricsSaver: %d image names for %d metric rows; writing row numbers instead.",
                len(names),
                scores["n_images"],
            )
            names = [str(i) for i in range(scores["n_images"])]
        scored = scores["per_image"].get("dice", scores["per_image"].get("iou"))
        if scored is not None and scores["n_scored"] < scores["n_images"]:
            unscored = [name for name, value in zip(names, scored) if np.isnan(value)]
            logger.warning(
                "SegmentationMetricsSaver: %d of %d images have no score (NaN; a metric with ignore_empty=True "
                "scores empty masks so) and are left out of mean and std: %s%s",
                len(unscored),
                scores["n_images"],
                ", ".join(unscored[:10]),
                ", ..." if len(unscored) > 10 else "",
            )
        return scores, names

    def _write_csv(self, filename: str, names: list[str], per_image: Mapping[str, np.ndarray]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(["image", *per_image])
        for i, name in enumerate(names):
            writer.writerow([name, *(f"{values[i]:.6f}" for values in per_image.values())])
        write_text_atomically(Path(self.save_dir) / filename, buffer.getvalue(), newline="")

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine at ``EPOCH_COMPLETED``.
        """
        world_size = idist.get_world_size()
        if self.save_rank >= world_size:
            raise ValueError("save_rank is greater than the distributed group size.")
        names = string_list_all_gather(strings=self._filenames) if world_size > 1 else list(self._filenames)
        results = [("network resolution", self.csv_filename, *self._scores(engine, self.scores, names))]
        if self.original_metrics:
            results.append(
                ("original resolution", self.original_csv_filename, *self._scores(engine, self.original_metrics, names))
            )
        if idist.get_rank() != self.save_rank:
            return
        summaries = []
        for _, filename, scores, rows in results:
            self._write_csv(filename, rows, scores["per_image"])
            summaries.append({k: v for k, v in scores.items() if k != "per_image"})
        self.summary = dict(summaries[0])
        if len(summaries) > 1:
            self.summary["resolution"] = "network"
            self.summary["original_resolution"] = summaries[1]

        def number(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {k: number(v) for k, v in value.items()}
            return None if isinstance(value, float) and not math.isfinite(value) else value

        write_text_atomically(Path(self.save_dir) / self.summary_filename, json.dumps(number(self.summary), indent=2))

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        for (label, *_), scores in zip(results, summaries):
            logger.info(
                "Dice %s ± %s, IoU %s ± %s (mean ± std over %d images); global Dice %s, global IoU %s "
                "(all pixels)%s",
                fmt(scores["dice_mean"]),
                fmt(scores["dice_std"]),
                fmt(scores["iou_mean"]),
                fmt(scores["iou_std"]),
                scores["n_scored"],
                fmt(scores["global_dice"]),
                fmt(scores["global_iou"]),
                f" at the {label}" if len(results) > 1 else "",
            )
