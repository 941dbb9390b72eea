"""The `lmtrain` command as a user runs it: from the checkout and from an installed wheel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lmtrain_testing import CHILD_ENV, REPO, TINY_TRAIN, communicate, compose, run_cli, wait_for
from lmtrain.config import conf_dir, to_typed

pytestmark = pytest.mark.slow


def test_help_lists_groups_and_commands(tmp_path):
    out = run_cli(["train", "--help"], cwd=tmp_path).stdout
    for group in ("model:", "data:", "tokenizer:", "optim:", "schedule:", "strategy:", "trainer:", "logger:", "experiment:"):
        assert group in out
    assert "gpt2_124m" in out and "seed_transformer" in out
    top = run_cli(["--help"], cwd=tmp_path).stdout
    assert all(cmd in top for cmd in ("prepare", "train", "generate", "eval"))


def usr1_caught(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGUSR1 (the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGUSR1 - 1) & 1)


def test_a_requeue_signal_during_startup_does_not_kill_a_slurm_task(tmp_path):
    """SLURM may send the time-limit signal up to a minute early, so it can arrive while the task
    still imports torch and Lightning (seconds): the handler must be in place before those imports."""
    code = "import lmtrain.cli, sys; print(sorted(m for m in ('torch', 'lightning', 'hydra') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    env = {**os.environ, **CHILD_ENV, "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen([sys.executable, "-m", "lmtrain", "train", "--help"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Signal at the first moment the handler exists (the kernel lists the signal as caught), which
    # is before the training stack's imports begin; sooner would be before the CLI could catch it.
    wait_for(lambda: usr1_caught(proc.pid) or proc.poll() is not None, what="the USR1 handler to be installed")
    assert proc.poll() is None, "the CLI exited before it installed its USR1 handler"
    proc.send_signal(signal.SIGUSR1)
    out, err = communicate(proc, what="lmtrain train --help")
    assert proc.returncode == 0, (proc.returncode, err[-2000:])
    assert "model:" in out


def test_bad_override_fails_before_work_with_a_named_key(tmp_path):
    proc = run_cli(["train", "trainer.max_stepz=3"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "max_stepz" in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_prepare_train_generate_eval(prepared, tmp_path):
    # prepare again through the CLI: the data is already there, so it must do nothing.
    again = run_cli(["prepare", *prepared], cwd=tmp_path)
    assert "already prepared" in again.stdout
    trained = run_cli(["train", *prepared, *TINY_TRAIN, "trainer.max_steps=30", "trainer.val_every_steps=15",
                       "run_name=r"], cwd=tmp_path)
    # Output is for the user: no hosted-logger advertisement, no srun hint on a machine that has srun.
    shown = trained.stdout + trained.stderr
    assert "litlogger" not in shown and "prepend your python command with `srun`" not in shown
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    gen = run_cli(["generate", f"ckpt={ckpt}", "prompt=The cat", "max_new_tokens=20", "temperature=0"], cwd=tmp_path)
    assert gen.stdout.startswith("The cat") and len(gen.stdout.rstrip("\n")) > len("The cat")
    ev = run_cli(["eval", f"ckpt={ckpt}"], cwd=tmp_path)
    assert "val loss" in ev.stdout and "bits/byte" in ev.stdout
    missing = run_cli(["generate", f"ckpt={tmp_path / 'nope.ckpt'}"], cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "nope.ckpt does not exist" in missing.stderr


def test_wheel_ships_conf_and_runs_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("lmtrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmtrain/conf/train.yaml" in names and "lmtrain/conf/model/gpt2_124m.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": str(site)}
    code = "import lmtrain, sys; print(lmtrain.__file__); sys.argv=['lmtrain','train','--help']; from lmtrain.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(site)) and "gpt2_124m" in proc.stdout


def all_group_options() -> list[tuple[str, str]]:
    root = conf_dir()
    return [(d.name, f.stem) for d in sorted(root.iterdir()) if d.is_dir() for f in sorted(d.glob("*.yaml"))]


# Presets that need a user's value (a path) or a bigger model to validate.
NEEDS = {("data", "text_files"): ["data.paths=[x.txt]"], ("data", "jsonl_files"): ["data.paths=[x.jsonl]"],
         ("data", "parquet_files"): ["data.paths=[x.parquet]"], ("data", "task_files"): ["data.paths=[x.jsonl]"], ("tokenizer", "pretrained"): ["tokenizer.path=x.json"],
         ("trainer", "gpu"): ["model=gpt2_124m"]}


@pytest.mark.parametrize("group,option", all_group_options())
def test_every_preset_and_experiment_composes(group, option):
    config = {"data": "prepare", "tokenizer": "prepare", "cluster": "submit", "sweep": "sweep", "launcher": "sweep"}.get(
        group, "train")
    typed = to_typed(compose(config, [f"{group}={option}", *NEEDS.get((group, option), [])]))
    assert getattr(typed, group) is not None if hasattr(typed, group) else typed.model.name


def test_multirun_grid_gives_each_trial_its_own_run_dir(prepared, tmp_path):
    out = run_cli(["train", "-m", *prepared, *TINY_TRAIN, "trainer.max_steps=2", "trainer.val_every_steps=100",
                   "optim.lr=1e-3,3e-3", "run_name=grid"], cwd=tmp_path).stdout
    grid = tmp_path / "runs" / "grid"
    assert sorted(p.name for p in grid.iterdir() if p.is_dir()) == ["trial0", "trial1"]
    lrs = [__import__("yaml").safe_load((grid / t / "config.yaml").read_text())["optim"]["lr"] for t in ("trial0", "trial1")]
    assert lrs == [1e-3, 3e-3] and "trained to step 2" in out
