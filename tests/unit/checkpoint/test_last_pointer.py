"""last.ckpt is a small pointer file (object-store mounts have no symlinks); every reader resolves it,
an older run's symlink still works, and a broken pointer is an error that names what is there."""

from __future__ import annotations

import os

import pytest
import torch

from lmtrain.callbacks.checkpoint import point_last_at
from lmtrain.checkpoint import CheckpointError, detect_layout, load_checkpoint_file, load_record, resolve_checkpoint


def save_step(directory, step: int):
    path = directory / f"step-{step:08d}.ckpt"
    torch.save({"state_dict": {"w": torch.full((2,), float(step))}, "lmtrain": {"step": step}, "global_step": step}, path)
    return path


def test_pointer_names_the_newest_and_every_reader_follows_it(tmp_path):
    save_step(tmp_path, 1)
    point_last_at(tmp_path, save_step(tmp_path, 2))
    last = tmp_path / "last.ckpt"
    assert last.is_file() and not last.is_symlink() and last.stat().st_size < 100
    assert resolve_checkpoint(last) == tmp_path / "step-00000002.ckpt"
    assert load_checkpoint_file(last)["global_step"] == 2 and load_record(last)["lmtrain"]["step"] == 2
    assert detect_layout(last).name == "file"
    point_last_at(tmp_path, save_step(tmp_path, 3))  # replaced in place
    assert load_checkpoint_file(last)["global_step"] == 3
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    assert resolve_checkpoint(tmp_path / "step-00000001.ckpt") == tmp_path / "step-00000001.ckpt"


def test_an_older_runs_symlink_is_followed_and_replaced_by_a_pointer(tmp_path):
    save_step(tmp_path, 4)
    os.symlink("step-00000004.ckpt", tmp_path / "last.ckpt")
    assert load_checkpoint_file(tmp_path / "last.ckpt")["global_step"] == 4
    point_last_at(tmp_path, save_step(tmp_path, 5))  # the resumed run's next save
    assert not (tmp_path / "last.ckpt").is_symlink() and load_checkpoint_file(tmp_path / "last.ckpt")["global_step"] == 5


def test_a_pointer_to_a_missing_checkpoint_names_what_is_there(tmp_path):
    save_step(tmp_path, 7)
    point_last_at(tmp_path, tmp_path / "step-00000009.ckpt")
    with pytest.raises(CheckpointError, match=r"points at step-00000009.ckpt, which is not there \(found: \['step-00000007.ckpt'\]\)"):
        load_checkpoint_file(tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"lmtrain checkpoint pointer\n../../etc/passwd\n")
    with pytest.raises(CheckpointError, match="should name a step checkpoint"):
        resolve_checkpoint(tmp_path / "last.ckpt")
