"""Nothing lost, nothing silently wrong: one live writer per run dir, run names that stay inside
runs_dir, unknown keys refused with or without `+`, a stopped run that says so (non-zero), a
resume that never rolls a run back or logs a step twice, and a full disk that costs no checkpoint."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from lmtrain.checkpoint import CheckpointError, resolve_checkpoint

from lmtrain_testing import (
    TINY_TRAIN,
    communicate,
    losses_by_step,
    refusal_line,
    run_cli,
    start_cli,
    train_in_process,
    tree_signature,
    wait_for,
)

pytestmark = pytest.mark.slow


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, but owner.lock: the record of who owned the run dir last."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "owner.lock"}


def test_a_second_writer_is_refused_and_a_stopped_run_says_where_it_stopped(prepared, tmp_path):
    args = ["train", *prepared, *TINY_TRAIN, "trainer.max_steps=8", "trainer.ckpt_every_steps=2",
            "trainer.val_every_steps=100", "run_name=shared"]
    run_dir = tmp_path / "runs" / "shared"
    log = tmp_path / "first.log"
    # The first run stops after step 3 (a checkpoint at 2, step 3 logged) until it gets a SIGTERM, then
    # saves step 3 and stops.
    first = start_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": "hold:3"}, log=log)
    try:
        wait_for(lambda: "holding after step 3" in log.read_text() or first.poll() is not None,
                 what="the first run to reach step 3", progress=lambda: tree_signature([log, run_dir]))
        assert first.poll() is None, log.read_text()[-3000:]
        before = snapshot(run_dir)

        second = run_cli([*args, "optim.lr=1e-2"], cwd=tmp_path, check=False)
        line = refusal_line(second)
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "choose another run_name" in line
        assert snapshot(run_dir) == before  # nothing of the first run touched

        first.send_signal(signal.SIGTERM)
        communicate(first, what="the first run to stop")
    finally:
        if first.poll() is None:
            first.kill()
    out = log.read_text()
    assert first.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received: saving at step 3, then stopping" in out
    assert "stopped by SIGTERM at step 3 of 8; the newest checkpoint is step 3" in out and "run_name=shared" in out

    resumed = run_cli(args, cwd=tmp_path)  # the lock died with its owner
    assert "step-00000003.ckpt" in resumed.stdout and "trained to step 8" in resumed.stdout
    steps = [row["step"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in row]
    assert steps == list(range(1, 9))  # step 3 of the stopped attempt is not in the record twice


@pytest.mark.parametrize("name", ["..", "../elsewhere", ".", "a/b"])
def test_a_run_name_cannot_leave_runs_dir(prepared, tmp_path, name, cli):
    (tmp_path / "runs").mkdir()
    (tmp_path / "config.yaml").write_text("mine\n")
    before = snapshot(tmp_path)
    proc = cli(["train", *prepared, *TINY_TRAIN, "trainer.max_steps=1", f"run_name={name}"], tmp_path)
    assert f"run_name={name!r} is not a plain directory name" in refusal_line(proc)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "runs"]


@pytest.fixture(scope="module")
def small_run(prepared, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("small") / "runs" / "small"
    return train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=4", "trainer.ckpt_every_steps=2",
                             "trainer.val_every_steps=100"], run_dir)


@pytest.mark.parametrize("command,override,expected", [
    ("train", "+trainer.max_stepz=5", "unknown config key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)"),
    ("train", "trainer.max_stepz=5", "unknown config key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)"),
    ("generate", "+temprature=0", "unknown config key 'temprature' (did you mean 'temperature'?)"),
    ("eval", "+data.prepared=/x", "unknown config key 'data'"),
    ("generate", "num_samples=0", "num_samples=0 must be >= 1"),
])
def test_unknown_keys_fail_with_or_without_plus(prepared, small_run, tmp_path, command, override, expected, cli):
    args = ([*prepared, *TINY_TRAIN, f"runs_dir={tmp_path / 'runs'}"] if command == "train"
            else [f"ckpt={small_run / 'checkpoints' / 'last.ckpt'}"])
    before = snapshot(small_run)
    line = refusal_line(cli([command, *args, override], tmp_path))
    assert expected in line, line
    assert "valid keys" in line or "must be" in line, line
    assert snapshot(small_run) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no ghost run dir


def test_resume_never_rolls_a_run_back(prepared, small_run, capsys):
    base = [*prepared, *TINY_TRAIN, "trainer.ckpt_every_steps=2", "trainer.val_every_steps=100"]
    before = snapshot(small_run)
    with pytest.raises(ValueError, match=r"already at step 4, beyond trainer.max_steps=2; raise trainer.max_steps above 4"):
        train_in_process([*base, "trainer.max_steps=2"], small_run)
    capsys.readouterr()
    train_in_process([*base, "trainer.max_steps=4"], small_run)
    assert "already trained to step 4 = trainer.max_steps; nothing to do" in capsys.readouterr().out
    assert snapshot(small_run) == before


def test_init_from_on_a_run_with_checkpoints_is_reported(prepared, small_run, tmp_path, capsys):
    base = [*prepared, *TINY_TRAIN, "trainer.ckpt_every_steps=2", "trainer.val_every_steps=100"]
    run_dir = train_in_process([*base, "trainer.max_steps=2"], tmp_path / "runs" / "own")
    capsys.readouterr()
    train_in_process([*base, "trainer.max_steps=4", f"init_from={small_run / 'checkpoints' / 'last.ckpt'}"], run_dir)
    out = capsys.readouterr().out
    assert "init_from=" in out and "is not used: the run resumes from its own checkpoint" in out
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of that many bytes (a disk that really fills up); skipped where this
    process may not mount."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(prepared, small_run, small_disk):
    ckpt_bytes = (small_run / "checkpoints" / "step-00000002.ckpt").stat().st_size
    disk = small_disk(ckpt_bytes * 3 // 2)  # room for one checkpoint and the run's small files, not two
    base = [*prepared, *TINY_TRAIN, "trainer.ckpt_every_steps=2", "trainer.val_every_steps=100", "trainer.max_steps=4"]
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000004.ckpt: No space left on device "
                                              r"\(ENOSPC\); nothing was replaced, the newest complete checkpoint is .*step-00000002.ckpt"):
        train_in_process(base, disk / "runs" / "full")
    checkpoints = disk / "runs" / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-00000002.ckpt"]  # no temp file left
    assert torch.load(resolve_checkpoint(checkpoints / "last.ckpt"), weights_only=True)["global_step"] == 2
