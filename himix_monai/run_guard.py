"""
Start-of-run checks of the HiMix bundle: a run never destroys another run's results, and fails at once, with a
clear message, when its output cannot be written.

- :py:class:`OutputGuard` checks that the output folders can be written (evaluation: ``eval/``);
- :py:class:`TrainingRunGuard` adds what a training in a ``bundle_root`` needs: it refuses to start a new
  training over a folder that already holds a model (unless resumed or overwritten on purpose), takes a lock so
  that two trainings cannot write the same folder at once, and removes the temporary files that a kill during a
  checkpoint save left behind;
- :py:func:`require_split_items` stops a run whose datalist split is empty.

The bundle's configs call ``start()`` in ``initialize`` and ``release()`` in ``finalize``. A run that fails
releases its lock with the process (``filelock`` uses ``flock``: the operating system drops the lock when the
process ends, also after ``kill -9``, so no stale lock ever blocks the next run).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from himix_monai.config_utils import as_bool
from himix_monai.errors import HiMixError

__all__ = [
    "RunGuardError",
    "OutputGuard",
    "TrainingRunGuard",
    "refuse_earlier_outputs",
    "require_split_items",
    "remove_stale_temp_files",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".training.lock"


class RunGuardError(HiMixError, RuntimeError):
    """A run cannot start safely; the message names the folder or file and the ways out."""


def _rank() -> int:
    """The global rank of this process in its job: torch.distributed's rank, else torchrun's ``RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def _check_writable(folder: Path) -> str | None:
    """Create ``folder`` if needed and write a probe file into it; a message when that fails, else None.

    ``os.access`` is not enough: it answers yes to root for a read-only folder on a read-only mount, and says
    nothing about a folder that cannot be created (a file in the way). Writing a probe file tests what the run
    will do.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the output folder {folder}: {err.strerror or err}"
    if not folder.is_dir():
        return f"the output folder {folder} is not a folder"
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.", suffix=".tmp")
    except OSError as err:
        return f"cannot write to the output folder {folder}: {err.strerror or err}"
    os.close(descriptor)
    os.unlink(probe)
    return None


def remove_stale_temp_files(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Remove the temporary files that a kill during :py:func:`~himix_monai.checkpoints.save_checkpoint_atomically`
    left behind: ``.<name>.*.tmp`` for each ``name`` in ``folder``.

    Only regular files of exactly that pattern are removed; symbolic links and anything else are left alone. Call it
    only while no other run writes to ``folder`` (:py:class:`TrainingRunGuard` holds the folder's lock).

    Args:
        folder: the checkpoint folder.
        names: the checkpoint file names, e.g. ``["checkpoint_latest.pt", "model.pt"]``.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for path in folder.glob(f".{name}.*.tmp"):
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def refuse_earlier_outputs(
    outputs: Sequence[str | os.PathLike], overwrite: Any = False, what: str = "this run"
) -> None:
    """Stop before an inference or evaluation run replaces what an earlier run wrote, unless ``overwrite``.

    ``outputs`` are folders (refused when they hold any file not starting with ``.``) or files (refused when
    they exist). Inference writes its masks under fixed names (``<stem>_mask.png``), so a second run into the
    same folder would replace the first run's masks in silence.

    Args:
        outputs: the folders and files the run writes.
        overwrite: True (or ``"true"``) to replace them; text from the command line is read with ``as_bool``.
        what: the run, for the message.

    Raises:
        RunGuardError: naming the first folder or file that holds earlier outputs and the ways out.
    """
    if as_bool(overwrite, "overwrite"):
        return
    for output in map(Path, outputs):
        if output.is_dir():
            earlier = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
        else:
            earlier = [output.name] if output.exists() or output.is_symlink() else []
        if earlier:
            shown = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
            raise RunGuardError(
                f"{output} already holds the outputs of an earlier run ({shown}); {what} would replace them. "
                "Write elsewhere (--output_dir DIR or another --bundle_root), move them away, or replace them "
                "with --overwrite true."
            )


def require_split_items(items: list, datalist: str | os.PathLike, split: str, purpose: str = "") -> list:
    """Return ``items``; raise :py:class:`RunGuardError` naming the datalist and the split when it is empty.

    Args:
        items: the split's items, e.g. from :py:func:`~himix_monai.data.datalist.load_checked_datalist`.
        datalist: the datalist file (for the message).
        split: the split's name (for the message).
        purpose: why the split is needed (for the message).

    Examples::

        "data": "$himix_monai.run_guard.require_split_items(himix_monai.data.datalist.load_checked_datalist(
            @datalist, 'validation'), @datalist, 'validation')"
    """
    if len(items) > 0:
        return items
    why = f" {purpose}" if purpose else ""
    raise RunGuardError(
        f"{datalist}: the {split!r} split has no usable items{why}. Add {split} items to the datalist (e.g. run "
        f"the converter again with a {split} part, or move some training items to {split!r}), or use another "
        "--datalist."
    )


class OutputGuard:
    """Check at the start of a run that its output folders can be written (created when missing).

    Without it a read-only ``eval/`` or ``models/`` is found only when the first file is written, e.g. after a
    whole training epoch.

    Args:
        output_dirs: the folders the run writes to.
        earlier_outputs: files and folders the run would replace; an existing one stops the run unless
            ``overwrite`` (see :py:func:`refuse_earlier_outputs`).
        overwrite: replace earlier outputs.

    Examples::

        "run_guard": {"_target_": "himix_monai.run_guard.OutputGuard", "output_dirs": ["@output_dir"]},
        "initialize": ["$@run_guard.start()"],
        "finalize": ["$@run_guard.release()"]
    """

    def __init__(
        self,
        output_dirs: Sequence[str | os.PathLike],
        earlier_outputs: Sequence[str | os.PathLike] = (),
        overwrite: Any = False,
    ) -> None:
        self.output_dirs = [Path(d) for d in output_dirs]
        self.earlier_outputs = [Path(p) for p in earlier_outputs]
        self.overwrite = overwrite

    def check_output_dirs(self) -> None:
        """Raise :py:class:`RunGuardError` naming each output folder that cannot be created or written."""
        problems = [p for p in (_check_writable(d) for d in dict.fromkeys(self.output_dirs)) if p]
        if problems:
            raise RunGuardError(
                "; ".join(problems) + ". Make it writable, or write elsewhere (e.g. another --bundle_root)."
            )

    def start(self) -> None:
        """Run the checks (the bundle's ``initialize``): writable folders, no earlier outputs replaced in silence."""
        self.check_output_dirs()
        refuse_earlier_outputs(self.earlier_outputs, self.overwrite)

    def release(self) -> None:
        """Nothing to release (the bundle's ``finalize``)."""


class TrainingRunGuard(OutputGuard):
    """The start-of-training checks of a ``bundle_root``: nothing an earlier run made is lost, one training at a time.

    ``start()``, on every rank of a ``torch.distributed`` job (rank 0 does the work, the others get its verdict):

    1. the output folders (``models/``, ``logs/``) can be created and written;
    2. a lock on ``ckpt_dir`` (``models/.training.lock``, ``filelock``) is taken once per job, by rank 0: a second
       training in the same folder stops here, while the torchrun ranks of one job pass;
    3. a new training (``resume`` false) refuses to start when ``ckpt_dir`` already holds a model
       (``model.pt`` or ``checkpoint_latest.pt``), unless ``overwrite``; so does ``resume`` when there is only a
       ``model.pt`` and no training state to resume;
    4. stale ``.<checkpoint>.*.tmp`` files of a kill during a save are removed.

    ``release()`` (the bundle's ``finalize``) releases the lock; the operating system releases it when the process
    ends in any other way.

    Args:
        ckpt_dir: the checkpoint folder (``models/``).
        output_dirs: the other folders the training writes to (``logs/``).
        resume: the run continues the saved training state (``--resume true``).
        overwrite: a new training may replace the models in ``ckpt_dir`` (``--overwrite true``).
        model_files: the model files in ``ckpt_dir`` that a new training would replace.
        state_file: the training-state file in ``ckpt_dir`` that ``resume`` continues from.
        lock_timeout: seconds to wait for the lock; 0 fails at once.

    Examples::

        "run_guard": {
            "_target_": "himix_monai.run_guard.TrainingRunGuard",
            "ckpt_dir": "@ckpt_dir", "output_dirs": ["@log_dir"], "resume": "@resume", "overwrite": "@overwrite"
        },
        "initialize": ["$@distributed_setup", "$@run_guard.start()", "..."],
        "finalize": ["$@run_guard.release()", "..."]
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        output_dirs: Sequence[str | os.PathLike] = (),
        resume: Any = False,
        overwrite: Any = False,
        model_files: Sequence[str] = ("model.pt",),
        state_file: str = "checkpoint_latest.pt",
        lock_timeout: float = 0,
    ) -> None:
        super().__init__([ckpt_dir, *output_dirs])
        self.ckpt_dir = Path(ckpt_dir)
        self.resume = as_bool(resume, "resume")
        self.overwrite = as_bool(overwrite, "overwrite")
        self.model_files = list(model_files)
        self.state_file = state_file
        self.lock_timeout = float(lock_timeout)
        self.lock: FileLock | None = None

    @property
    def lock_path(self) -> Path:
        return self.ckpt_dir / LOCK_NAME

    def check_existing_models(self) -> None:
        """Raise :py:class:`RunGuardError` when this run would replace the models of an earlier run."""
        found = [name for name in [*self.model_files, self.state_file] if (self.ckpt_dir / name).exists()]
        if not found or self.overwrite or (self.resume and self.state_file in found):
            return
        ways = (
            "--resume true to continue that run, --overwrite true to replace it, or another --bundle_root for a "
            "new run beside it"
        )
        if self.resume:
            raise RunGuardError(
                f"{self.ckpt_dir} holds {', '.join(found)} but no training state ({self.state_file}) to resume: a "
                "resumed run would start afresh and replace them. Use --overwrite true to replace them, or another "
                "--bundle_root."
            )
        raise RunGuardError(
            f"{self.ckpt_dir} already holds {' and '.join(found)} of an earlier training; a new training would "
            f"overwrite {'them' if len(found) > 1 else 'it'}. Use {ways}."
        )

    def _acquire(self) -> None:
        if self.lock is not None:  # started already (idempotent)
            return
        lock = FileLock(self.lock_path, timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise RunGuardError(
                f"another training is running in {self.ckpt_dir.parent} (it holds {self.lock_path}); two trainings "
                "in one folder would overwrite each other's model and logs. Wait for it to end, or use another "
                "--bundle_root. (The lock ends with the process that holds it; only on a file system without "
                "flock, where filelock falls back to a lock file, can one outlive a crash: then delete "
                f"{self.lock_path}.)"
            ) from None
        self.lock = lock

    def _start_here(self) -> str | None:
        try:
            self.check_output_dirs()
            self._acquire()
            try:
                self.check_existing_models()
            except RunGuardError:
                self.release()
                raise
        except RunGuardError as err:
            return str(err)
        for path in remove_stale_temp_files(self.ckpt_dir, [*self.model_files, self.state_file]):
            logger.warning(f"removed {path}, left by a run that was killed while saving a checkpoint.")
        return None

    def start(self) -> None:
        """Run the checks and take the lock (rank 0); every rank raises :py:class:`RunGuardError` if they fail."""
        error = self._start_here() if _rank() == 0 else None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            verdict = [error]
            torch.distributed.broadcast_object_list(verdict, src=0)
            error = verdict[0]
        if error:
            raise RunGuardError(error)

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
