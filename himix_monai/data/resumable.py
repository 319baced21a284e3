"""
A data loader whose place in the epoch and random state can be saved and restored, so that a resumed training
sees the same batches, augmentations and random numbers as an uninterrupted one.

A training state (network, optimizer, trainer position) is not enough to continue a run exactly: the shuffle
order of the current epoch, the random state of every MONAI ``Randomizable`` transform (each has its own
``R``) and the global python/numpy/torch random states move on at every batch. ignite's own answer,
``ignite.engine.deterministic.DeterministicEngine``, re-seeds the global generators at every epoch and skips
batches in the batch sampler without loading them; MONAI's ``SupervisedTrainer`` is a plain ignite ``Engine``,
and skipping without loading leaves the transforms' random states behind. :py:class:`ResumableDataLoader` is
MONAI's ``DataLoader`` plus ``state_dict()`` / ``load_state_dict()`` (so that
:py:class:`~himix_monai.handlers.TrainingStateCheckpoint` saves it like the optimizer): it records the random
state when each epoch's iterator is made and counts the batches served. Restored in the middle of an epoch, it
rebuilds that epoch's iterator from the recorded state, replays (loads and drops) the batches already trained
on, so that the shuffle order and the transforms' random states (in worker processes too) are where they were,
then sets the random states saved with the checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from monai.data import DataLoader

__all__ = ["ResumableDataLoader", "get_random_state", "set_random_state"]


def _randomizables(root: Any) -> list:
    """Every object under ``root`` (lists, tuples and attributes, as MONAI's ``set_rnd`` walks them) that has its
    own ``numpy.random.RandomState`` ``R``: MONAI's ``Randomizable`` transforms, nested ones included."""
    found: list = []
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, dict, torch.Tensor, np.ndarray)):
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
            return
        if isinstance(getattr(obj, "R", None), np.random.RandomState):
            found.append(obj)
        for key, value in getattr(obj, "__dict__", {}).items():
            if not key.startswith("__"):
                walk(value)

    walk(root)
    return found


def _numpy_state(state: tuple) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state
    return {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    keys = np.asarray(state["keys"].numpy() if isinstance(state["keys"], torch.Tensor) else state["keys"], np.uint32)
    return (state["kind"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def get_random_state(randomizables: list = ()) -> dict[str, Any]:
    """The global python, numpy, torch (and CUDA) random states and those of ``randomizables``, as plain
    containers and tensors (a checkpoint of them loads with ``weights_only=True``).

    Args:
        randomizables: objects with a ``numpy.random.RandomState`` ``R`` (MONAI ``Randomizable`` transforms).
    """
    version, internal, gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": [int(version), [int(x) for x in internal], gauss],
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "transforms": [_numpy_state(obj.R.get_state()) for obj in randomizables],
    }


def set_random_state(state: Mapping[str, Any], randomizables: list = ()) -> None:
    """Set the random states recorded by :py:func:`get_random_state`.

    Args:
        state: from :py:func:`get_random_state`.
        randomizables: the same objects, in the same order, as when it was recorded.

    Raises:
        ValueError: the number of random transforms differs (another preprocessing).
    """
    saved = list(state["transforms"])
    if len(saved) != len(randomizables):
        raise ValueError(
            f"the saved data state has {len(saved)} random transforms, this data loader {len(randomizables)}: "
            "resume with the same preprocessing (train#augmentation), or start afresh."
        )
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    np.random.set_state(_numpy_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for obj, obj_state in zip(randomizables, saved):
        obj.R.set_state(_numpy_tuple(obj_state))


class _CountingIterator:
    """Counts the batches the loader served in the current epoch."""

    def __init__(self, loader: ResumableDataLoader, iterator: Iterator) -> None:
        self.loader = loader
        self.iterator = iterator

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader.served += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)


class ResumableDataLoader(DataLoader):
    """MONAI ``DataLoader`` that saves and restores its place in the epoch and the random state (see the module
    docstring): put it in the training-state checkpoint's ``save_dict`` to resume a training exactly.

    ``state_dict()`` holds the random state when the current epoch's iterator was made, the number of batches
    served from it, and the random state now (global python/numpy/torch/CUDA generators and the ``R`` of every
    random transform of ``dataset.transform``). After ``load_state_dict()``, the next iterator continues the saved
    epoch (the batches already served are loaded again and dropped) or, when that epoch was complete, starts
    the next one from the saved random state. An uninterrupted and a resumed run then see the same data and random
    numbers: on the CPU their losses are equal; on a GPU too with deterministic algorithms
    (``torch.use_deterministic_algorithms``, the bundle's ``--deterministic_algorithms true``).

    Args:
        dataset: the dataset.
        num_workers: worker processes (see MONAI's ``DataLoader``).
        kwargs: the other ``DataLoader`` arguments (``batch_size``, ``shuffle``, ``sampler``, ...).

    Examples::

        "dataloader": {"_target_": "himix_monai.data.resumable.ResumableDataLoader", "dataset": "@train#dataset",
                       "batch_size": 8, "shuffle": true},
        "checkpoint_saver": {"_target_": "himix_monai.handlers.TrainingStateCheckpoint",
                             "save_dict": {"network": "@network", "trainer": "@train#trainer",
                                           "data_loader": "@train#dataloader"}, "...": "..."}
    """

    def __init__(self, dataset: Any, num_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(dataset, num_workers=num_workers, **kwargs)
        self.served = 0
        self._epoch_start: dict[str, Any] | None = None
        self._pending: Mapping[str, Any] | None = None

    def randomizables(self) -> list:
        """The random transforms of ``dataset.transform`` whose states are saved."""
        return _randomizables(getattr(self.dataset, "transform", None))

    def state_dict(self) -> dict[str, Any]:
        """The random state when the current epoch's iterator was made, the batches served since, the state now."""
        now = get_random_state(self.randomizables())
        return {"epoch_start": self._epoch_start, "served": int(self.served), "now": now}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore at the next ``iter()`` (when the trainer starts its epoch)."""
        self._pending = dict(state)

    def __iter__(self) -> Iterator:
        pending, self._pending = self._pending, None
        randomizables = self.randomizables()
        if pending is not None and pending.get("epoch_start") is not None and 0 < pending["served"] < len(self):
            set_random_state(pending["epoch_start"], randomizables)
            self._epoch_start, self.served = pending["epoch_start"], 0
            iterator = _CountingIterator(self, super().__iter__())
            for _ in range(int(pending["served"])):  # replay: same order, same augmentation random draws
                next(iterator)
            set_random_state(pending["now"], randomizables)
            return iterator
        if pending is not None:
            set_random_state(pending["now"], randomizables)
        self._epoch_start, self.served = get_random_state(randomizables), 0
        return _CountingIterator(self, super().__iter__())
