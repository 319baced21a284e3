"""himix_monai.files: new files are written atomically beside earlier ones, never over them or through a link."""

from __future__ import annotations

import pytest

from himix_monai.files import atomic_path, write_new_file


def test_write_new_file_takes_the_next_free_name_and_never_writes_through_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"precious")
    (tmp_path / "case_words.png").write_bytes(b"earlier run")
    (tmp_path / "case_words_1.png").symlink_to(elsewhere)
    written = write_new_file(tmp_path / "case_words.png", lambda stream: stream.write(b"new"))
    assert written == tmp_path / "case_words_2.png" and written.read_bytes() == b"new"
    assert (tmp_path / "case_words.png").read_bytes() == b"earlier run" and elsewhere.read_bytes() == b"precious"
    assert write_new_file(tmp_path / "volume.nii.gz", lambda stream: stream.write(b"a")).name == "volume.nii.gz"
    assert write_new_file(tmp_path / "volume.nii.gz", lambda stream: stream.write(b"b")).name == "volume_1.nii.gz"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_atomic_path_without_replace_refuses_an_existing_name(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"earlier")
    with pytest.raises(FileExistsError):
        with atomic_path(target, replace=False) as temp:
            temp.write_bytes(b"new")
    assert target.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
