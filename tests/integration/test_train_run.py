"""Real training runs on a small real corpus: the loss falls, resume is bitwise exact after a
SIGKILL, and a kill during a checkpoint write loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmtrain_testing import TINY_TRAIN, losses_by_step, run_cli, train_in_process
from lmtrain.checkpoint import resolve_checkpoint

pytestmark = pytest.mark.slow


def test_loss_falls_and_run_dir_is_complete(prepared, tmp_path, capsys):
    run_dir = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=60", "trainer.val_every_steps=30",
                                "trainer.ckpt_every_steps=30"], tmp_path / "run")
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, 61))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(56, 61)) / 5
    assert last < first - 1.0, (first, last)
    out = capsys.readouterr().out
    assert "unigram entropy" in out and "--- sample ---" in out
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "tokenizer.json").is_file()
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(last_ckpt).name == "step-00000060.ckpt" and not last_ckpt.is_symlink()
    ckpt = torch.load(resolve_checkpoint(last_ckpt), weights_only=True)  # loads with weights_only=True
    record = ckpt["lmtrain"]
    assert record["config"]["trainer"]["max_steps"] == 60 and record["version"]
    assert record["tokenizer_hash"] and len(record["rng"]["per_rank"]) == 1
    dm_state = next(v for k, v in ckpt.items() if k.endswith("LMDataModule"))
    assert dm_state["consumed_samples"] == 60 * 4
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["global_step"] == 60


COMMON = ["trainer.max_steps=24", "trainer.val_every_steps=100", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The reference runs, one per logging cadence, made once for the module."""
    made: dict[int, Path] = {}

    def run_dir(log_every: int) -> Path:
        if log_every not in made:
            cwd = tmp_path_factory.mktemp(f"uninterrupted-log{log_every}")
            run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, "trainer.ckpt_every_steps=100", "run_name=ref",
                     f"trainer.log_every_steps={log_every}"], cwd=cwd)
            made[log_every] = cwd / "runs" / "ref"
        return made[log_every]

    return run_dir


def final_state(run_dir: Path) -> dict:
    return torch.load(resolve_checkpoint(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)["state_dict"]


@pytest.mark.parametrize("kill_step,log_every", [(6, 1), (16, 1), (6, 5)],
                         ids=["mid-epoch-1", "after-epoch-boundary", "inside-a-logging-window"])
def test_sigkill_then_resume_is_bitwise_exact(prepared, uninterrupted, tmp_path, kill_step, log_every):
    """N steps, SIGKILL, resume, the rest == the uninterrupted run, loss at every logged step and final
    weights. The corpus is ~12 steps per epoch at this batch, so both cases cross an epoch boundary
    after resuming or before. Logging every 5 steps with a checkpoint at 6, the first loss the resumed
    run logs (step 10) averages steps 6-10 as the uninterrupted run's does, not 7-10 only."""
    args = ["train", *prepared, *TINY_TRAIN, *COMMON, f"trainer.ckpt_every_steps={kill_step}", "run_name=job",
            f"trainer.log_every_steps={log_every}"]
    killed = run_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": f"kill_after_checkpoint:{kill_step}"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "job"
    assert max(losses_by_step(run_dir)) == kill_step - kill_step % log_every
    resumed = run_cli(args, cwd=tmp_path)
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{kill_step:08d}.ckpt'}" in resumed.stdout
    expected, got = losses_by_step(uninterrupted(log_every)), losses_by_step(run_dir)
    logged = [s for s in range(1, 25) if s % log_every == 0 or s == 24]
    assert sorted(got) == logged
    assert [got[s] for s in logged] == [expected[s] for s in logged]  # bitwise: float equality
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    ref, mine = final_state(uninterrupted(log_every)), final_state(run_dir)
    assert ref.keys() == mine.keys()
    for name in ref:
        assert torch.equal(ref[name], mine[name]), name


def test_sigkill_during_checkpoint_write_keeps_previous(prepared, tmp_path):
    args = ["train", *prepared, *TINY_TRAIN, "trainer.max_steps=12", "trainer.ckpt_every_steps=6",
            "trainer.val_every_steps=100", "run_name=job"]
    killed = run_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": "kill_during_checkpoint_write:12"}, check=False)
    assert killed.returncode == -9
    ckpt_dir = tmp_path / "runs" / "job" / "checkpoints"
    assert not (ckpt_dir / "step-00000012.ckpt").exists()
    assert list(ckpt_dir.glob("*.tmp-*")), "the interrupted write should have left its temp file"
    assert resolve_checkpoint(ckpt_dir / "last.ckpt").name == "step-00000006.ckpt"
    assert torch.load(resolve_checkpoint(ckpt_dir / "last.ckpt"), weights_only=True)["global_step"] == 6
    resumed = run_cli(args, cwd=tmp_path)
    assert "step-00000006.ckpt" in resumed.stdout and "interrupted" in resumed.stdout
    assert not list(ckpt_dir.glob("*.tmp-*"))
    assert torch.load(resolve_checkpoint(ckpt_dir / "last.ckpt"), weights_only=True)["global_step"] == 12


def test_corrupt_newest_checkpoint_falls_back_to_previous(prepared, tmp_path, capsys, caplog):
    base = [*prepared, *TINY_TRAIN, "trainer.val_every_steps=100", "trainer.ckpt_every_steps=4"]
    run_dir = train_in_process([*base, "trainer.max_steps=8"], tmp_path / "run")
    newest = run_dir / "checkpoints" / "step-00000008.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    capsys.readouterr()
    train_in_process([*base, "trainer.max_steps=12"], run_dir)
    out = capsys.readouterr().out
    assert "resuming from" in out and "step-00000004.ckpt" in out
    assert "step-00000008.ckpt" in caplog.text and "cannot be read" in caplog.text
    assert torch.load(resolve_checkpoint(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)["global_step"] == 12


def test_compile_and_activation_checkpointing_match_eager_and_keep_clean_keys(prepared, tmp_path):
    base = [*prepared, *TINY_TRAIN, "trainer.max_steps=4", "trainer.val_every_steps=100", "model.dropout=0.0"]
    eager = train_in_process(base, tmp_path / "eager")
    both = train_in_process([*base, "trainer.compile=true", "trainer.activation_checkpointing=true"], tmp_path / "both")
    keys = torch.load(resolve_checkpoint(both / "checkpoints" / "last.ckpt"), weights_only=True)["state_dict"].keys()
    assert not [k for k in keys if "_orig_mod" in k or "checkpoint" in k]
    assert keys == torch.load(resolve_checkpoint(eager / "checkpoints" / "last.ckpt"), weights_only=True)["state_dict"].keys()
    a, b = losses_by_step(eager), losses_by_step(both)
    assert [b[s] for s in range(1, 5)] == pytest.approx([a[s] for s in range(1, 5)], rel=1e-4)
