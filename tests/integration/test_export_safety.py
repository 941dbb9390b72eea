"""`lmtrain export` writes only where it may: never over a training checkpoint (not even with
overwrite=true), over another existing file only with overwrite=true, always through a temp file
and a rename; bad paths end with one line, not a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmtrain_testing import CHILD_ENV, TINY_TRAIN, refusal_line, train_in_process
from lmtrain.checkpoint import resolve_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(prepared, tmp_path_factory) -> Path:
    """A real run with step-1, step-2 and last.ckpt -> step-2 (the layout the issue's run had)."""
    root = tmp_path_factory.mktemp("export-safety")
    return train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=2", "trainer.ckpt_every_steps=1",
                             "trainer.val_every_steps=100"], root / "runs" / "r")


def snapshot(directory: Path) -> dict[str, bytes | str]:
    """Every entry of a directory: file bytes, or a symlink's target."""
    return {p.name: os.readlink(p) if p.is_symlink() else p.read_bytes() for p in sorted(directory.iterdir()) if not p.is_dir()}


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The refusal (one `lmtrain: error:` line, exit 2), and no export written."""
    assert "exported" not in proc.stdout
    return refusal_line(proc)


@pytest.fixture
def export(cli):
    """`lmtrain export ...` through the CLI entry point, in this process."""
    return lambda args, cwd: cli(["export", *args], cwd)


@pytest.mark.parametrize("target,overwrite", [("step-00000002.ckpt", False), ("step-00000002.ckpt", True),
                                              ("last.ckpt", True), ("export.pt", True)],
                         ids=["newest-step", "newest-step-overwrite", "last-symlink-overwrite", "new-file-in-checkpoints"])
def test_nothing_is_written_into_a_runs_checkpoints(export, run_dir, target, overwrite):
    checkpoints = run_dir / "checkpoints"
    before = snapshot(checkpoints)
    out = checkpoints / target
    proc = export([f"ckpt={checkpoints / 'last.ckpt'}", f"out={out}", *(["overwrite=true"] if overwrite else [])], run_dir)
    line = error_line(proc)
    assert str(out) in line and "never written over" in line
    assert snapshot(checkpoints) == before  # byte-identical, last.ckpt still -> step-2, no temp file
    assert resolve_checkpoint(checkpoints / "last.ckpt").name == "step-00000002.ckpt"


def test_a_checkpoint_kept_elsewhere_and_the_input_itself_are_refused(export, run_dir, tmp_path):
    backup = tmp_path / "backup.pt"  # an lmtrain checkpoint by content, not by name or place
    shutil.copyfile(run_dir / "checkpoints" / "step-00000001.ckpt", backup)
    original = backup.read_bytes()
    line = error_line(export([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={backup}", "overwrite=true"], tmp_path))
    assert str(backup) in line and "lmtrain training checkpoint" in line
    line = error_line(export([f"ckpt={backup}", f"out={backup}", "overwrite=true"], tmp_path))
    assert str(backup) in line and "input checkpoint" in line
    assert backup.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == ["backup.pt"]


def test_an_unrelated_file_needs_overwrite_and_then_is_replaced(export, run_dir, tmp_path):
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"not mine to delete\n")
    ckpt = f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"
    line = error_line(export([ckpt, "format=safetensors", f"out={notes}"], tmp_path))
    assert str(notes) in line and "overwrite=true" in line
    assert notes.read_bytes() == b"not mine to delete\n"

    assert export([ckpt, "format=safetensors", f"out={notes}", "overwrite=true"], tmp_path).returncode == 0
    from safetensors.torch import load_file

    state = load_file(notes)
    step2 = torch.load(resolve_checkpoint(run_dir / "checkpoints" / "step-00000002.ckpt"), weights_only=True)["state_dict"]
    torch.testing.assert_close(state["tok_embeddings.weight"], step2["model.tok_embeddings.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors"]  # no temp file left


def test_the_default_output_is_not_overwritten_silently(export, run_dir):
    ckpt = f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}"
    default = run_dir / "export-step-00000002-fp32.pt"
    try:
        assert export([ckpt], run_dir).returncode == 0
        first = default.read_bytes()
        default.write_bytes(first + b"edited by hand")
        line = error_line(export([ckpt], run_dir))
        assert str(default) in line and "overwrite=true" in line and "default" in line
        assert default.read_bytes() == first + b"edited by hand"
        assert export([ckpt, "overwrite=true"], run_dir).returncode == 0
        assert default.read_bytes() == first
        assert set(torch.load(resolve_checkpoint(default), weights_only=True)) == {"model", "lmtrain"}
    finally:
        default.unlink(missing_ok=True)


@pytest.mark.parametrize("case", ["out-is-a-directory", "out-under-a-file", "missing-ckpt"])
def test_bad_paths_end_with_one_line(export, run_dir, tmp_path, case):
    ckpt, out = run_dir / "checkpoints" / "last.ckpt", tmp_path / "exports"
    match case:
        case "out-is-a-directory":
            out.mkdir()
            expected = [str(out), "is a directory"]
        case "out-under-a-file":  # the parent is a regular file: fails for root too (NotADirectoryError)
            (tmp_path / "plain").write_text("x")
            out = tmp_path / "plain" / "sub" / "model.pt"
            expected = [str(out), f"{tmp_path / 'plain'} is not a directory"]
        case "missing-ckpt":
            ckpt = run_dir / "checkpoints" / "step-00000099.ckpt"
            expected = [str(ckpt), "does not exist"]
    line = error_line(export([f"ckpt={ckpt}", f"out={out}"], tmp_path))
    assert all(text in line for text in expected), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0o555 directory; the not-a-directory case covers root")
def test_a_read_only_directory_ends_with_one_line(export, run_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = error_line(export([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={locked / 'model.pt'}"], tmp_path))
    assert f"{locked} is not writable" in line
    assert list(locked.iterdir()) == []


# The file-size limit makes the write fail part way for any user, root included (EFBIG).
LIMITED_CLI = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)); from lmtrain.cli import main; main(sys.argv[1:])")


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temp(run_dir, tmp_path, fmt):
    old = tmp_path / "model.out"
    old.write_bytes(b"the previous export\n")
    proc = subprocess.run([sys.executable, "-c", LIMITED_CLI, "export", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
                           f"format={fmt}", f"out={old}", "overwrite=true"], cwd=tmp_path, env={**os.environ, **CHILD_ENV},
                          capture_output=True, text=True)
    line = error_line(proc)
    assert f"could not write the export to {old}: File too large" in line and "unchanged" in line
    assert old.read_bytes() == b"the previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.out"]
