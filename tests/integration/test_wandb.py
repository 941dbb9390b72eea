"""W&B runs for real (offline); the tests read back what wandb wrote with its own reader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmtrain_testing import TINY_TRAIN, losses_by_step, run_cli

pytestmark = pytest.mark.slow


def wandb_records(run_dir: Path) -> list[tuple[str, list[dict]]]:
    """(run id, records) of every offline attempt directory, oldest first."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    attempts = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        log = next(d.glob("run-*.wandb"))
        out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log)], capture_output=True, text=True,
                             check=True).stdout
        attempts.append((log.stem.removeprefix("run-"), [json.loads(line) for line in out.splitlines() if line.strip()]))
    return attempts


def test_offline_run_survives_a_sigkill_with_one_run_id(prepared, tmp_path):
    args = ["train", *prepared, *TINY_TRAIN, "trainer.max_steps=8", "trainer.ckpt_every_steps=4",
            "trainer.val_every_steps=4", "logger=wandb", "logger.mode=offline", "logger.group=ablation-1",
            "logger.tags=[tiny,test]", "run_name=wb"]
    killed = run_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": "kill_after_checkpoint:4"}, check=False)
    assert killed.returncode == -9
    run_cli(args, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "wb"
    attempts = wandb_records(run_dir)
    assert len(attempts) == 2 and attempts[0][0] == attempts[1][0]  # one run id, one directory per attempt

    history = [r["history"]["item"] for _, records in attempts for r in records if r["type"] == "history"]
    train_steps = [h["trainer/global_step"] for h in history if "train/loss" in h]
    assert train_steps == list(range(1, 9))  # merged: every step once, never backwards
    expected = losses_by_step(run_dir)
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx([expected[s] for s in range(1, 9)])
    assert any("val/loss" in h and "val/bpb" in h for h in history)

    run_record = next(r["run"] for r in attempts[-1][1] if r["type"] == "run")  # a SIGKILLed attempt may hold nothing
    config = run_record["config"]["update"]
    assert config["trainer"]["max_steps"] == 8 and config["model"]["d_model"] == 32 and config["git_commit"]
    assert config["logger"]["group"] == "ablation-1"
    assert run_record["run_group"] == "ablation-1" and "tiny" in run_record["tags"] and run_record["run_id"] == attempts[0][0]
