"""LossCSVWriter: one row an iteration, never written through a link, a full disk named."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pytest
import torch

from himix_monai.errors import OutOfSpaceError
from himix_monai.handlers import LossCSVWriter


def _iteration(writer: LossCSVWriter, iteration: int, loss: float) -> None:
    state = SimpleNamespace(epoch=1, iteration=iteration, output={"loss": torch.tensor(loss)})
    writer(SimpleNamespace(state=state))


def test_a_link_in_place_of_the_loss_file_is_replaced_not_written_through(tmp_path):
    elsewhere = tmp_path / "another_run.csv"
    elsewhere.write_text("epoch,iteration,loss\n1,1,0.9\n1,2,0.8\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train_loss.csv").symlink_to(elsewhere)
    writer = LossCSVWriter(logs / "train_loss.csv")
    _iteration(writer, 1, 0.5)
    _iteration(writer, 2, 0.25)
    assert elsewhere.read_text() == "epoch,iteration,loss\n1,1,0.9\n1,2,0.8\n"
    assert not (logs / "train_loss.csv").is_symlink()
    assert (logs / "train_loss.csv").read_text() == "epoch,iteration,loss\n1,1,0.5\n1,2,0.25\n"


def test_a_full_disk_while_appending_names_the_file_and_the_iteration(tmp_path, monkeypatch):
    writer = LossCSVWriter(tmp_path / "train_loss.csv")
    _iteration(writer, 1, 0.5)

    class FullDisk:
        def __init__(self, descriptor, *args, **kwargs):
            os.close(descriptor)

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(OutOfSpaceError, match=r"Could not write .*train_loss.csv: the disk .* is full") as info:
        _iteration(writer, 2, 0.25)
    assert "The loss of iteration 2 is missing or cut short at its end." in str(info.value)
