from __future__ import annotations

import pytest
import torch

from torch import nn

from lmtrain.checkpoint import CheckpointError, Layout, find_resume_checkpoint, load_checkpoint_file, shape_mismatches
from lmtrain.checkpoint.io import save_atomic


class W(nn.Module):
    def __init__(self, rows: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(rows, 3))


def good(step: int) -> dict:
    return {"state_dict": {"w": torch.full((2, 3), float(step))}, "lmtrain": {"version": "x"}, "global_step": step}


def test_save_atomic_leaves_no_temp_and_replaces(tmp_path):
    path = tmp_path / "c" / "step-00000001.ckpt"
    save_atomic(good(1), path)
    save_atomic(good(2), path)
    assert load_checkpoint_file(path)["global_step"] == 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"garbage" * 10, "cannot be read")])
def test_unreadable_files_are_named(tmp_path, content, match):
    path = tmp_path / "step-00000003.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint_file(path)
    assert str(path) in str(e.value)


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "step-00000003.ckpt"
    save_atomic(good(3), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint_file(path)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an lmtrain checkpoint"):
        load_checkpoint_file(foreign)


def test_resume_picks_newest_valid_and_skips_broken(tmp_path, caplog):
    for step in (2, 4, 6):
        save_atomic(good(step), tmp_path / f"step-{step:08d}.ckpt")
    (tmp_path / "step-00000006.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"stray")  # a stray file must not break anything
    found = find_resume_checkpoint(tmp_path, W(), layout=Layout.file, world_size=1)
    assert found.name == "step-00000004.ckpt"
    assert "step-00000006.ckpt" in caplog.text


def test_another_model_shape_is_an_error_naming_tensors(tmp_path):
    save_atomic(good(2), tmp_path / "step-00000002.ckpt")
    with pytest.raises(CheckpointError, match=r"w: checkpoint \(2, 3\) vs model \(4, 3\)"):
        find_resume_checkpoint(tmp_path, W(rows=4), layout=Layout.file, world_size=1)
    assert shape_mismatches({"a": torch.zeros(1)}, {"b": torch.zeros(1)}) == [
        "b: missing from the checkpoint", "a: in the checkpoint but not in the model"]


def test_a_checkpoint_of_another_layout_is_refused_with_the_way_out(tmp_path):
    save_atomic(good(2), tmp_path / "step-00000002.ckpt")
    with pytest.raises(CheckpointError, match="is a file checkpoint but this run's strategy writes deepspeed ones.*init_from="):
        find_resume_checkpoint(tmp_path, W(), layout=Layout.deepspeed, world_size=2)
