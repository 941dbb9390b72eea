"""A DeepSpeed ZeRO checkpoint written by 2 ranks resumes on 1 rank (2 micro batches of accumulation,
the same global batch) at the same step and data position: rank 0 converts it to DeepSpeed's
universal checkpoint by itself, and the steps after the resume have the uninterrupted 2-rank run's
losses. A conversion killed half way is never trusted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from lmtrain_testing import CHILD_ENV, TINY_TRAIN, losses_by_step, run_cli
from lmtrain.checkpoint.universal import (POINTER, TMP_PREFIX, UNIVERSAL_TAG, needs_universal, universal_dir,
                                         wait_for_universal)

COMMON = ["trainer.max_steps=6", "trainer.ckpt_every_steps=3", "trainer.val_every_steps=100", "trainer.accelerator=cpu",
          "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "model.dropout=0.0"]
STEP3 = "step-00000003.ckpt"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_of_2_ranks_resumes_on_1_rank(prepared, tmp_path, stage):
    base = ["train", *prepared, *TINY_TRAIN, *COMMON, f"strategy=deepspeed_zero{stage}"]
    # The uninterrupted 2-rank run; its step-3 checkpoint is the one resumed.
    run_cli([*base, "trainer.devices=2", "run_name=ref"], cwd=tmp_path)
    reference = losses_by_step(tmp_path / "runs" / "ref")
    source = tmp_path / "runs" / "ref" / "checkpoints" / STEP3
    assert universal_dir(source) is None  # a same-world run converts nothing

    run_dir = tmp_path / "runs" / "one"
    ckpt = run_dir / "checkpoints" / STEP3
    shutil.copytree(source, ckpt)
    args = [*base, "trainer.devices=1", "run_name=one"]
    if stage == 2:  # a conversion SIGKILLed before its rename leaves nothing that a resume trusts
        convert = ("from pathlib import Path; from lmtrain.checkpoint.universal import convert_to_universal; "
                   f"convert_to_universal(Path({str(ckpt)!r}))")
        fault = {"DS_ACCELERATOR": "cpu", "LMTRAIN_FAULT": "kill_during_universal_conversion:3"}
        killed = subprocess.run([sys.executable, "-c", convert], env={**os.environ, **CHILD_ENV, **fault},
                                capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert not (ckpt / POINTER).exists() and universal_dir(ckpt) is None
        assert list(ckpt.glob(f"{TMP_PREFIX}*"))  # its temp dir, removed by the next attempt
        (ckpt / UNIVERSAL_TAG).mkdir()  # as if the rename happened but the pointer was never written
    out = run_cli(args, cwd=tmp_path).stdout
    assert f"resuming from {ckpt}" in out and "to a DeepSpeed universal checkpoint" in out
    assert universal_dir(ckpt) == ckpt / UNIVERSAL_TAG
    assert {p.name for p in ckpt.iterdir()} - {p.name for p in source.iterdir()} == {POINTER, UNIVERSAL_TAG}

    losses = losses_by_step(run_dir)
    assert sorted(losses) == [4, 5, 6]
    assert [losses[s] for s in (4, 5, 6)] == pytest.approx([reference[s] for s in (4, 5, 6)], rel=1e-5)
    # the 1-rank run's own checkpoint records its world size: resuming it on 1 rank converts nothing
    step6 = run_dir / "checkpoints" / "step-00000006.ckpt"
    assert universal_dir(step6) is None and not needs_universal(step6, 1) and needs_universal(step6, 2)


def test_other_ranks_wait_for_rank_0s_conversion_and_give_up_when_it_stalls(tmp_path):
    import threading

    from lmtrain.checkpoint import CheckpointError

    ckpt = tmp_path / STEP3
    (ckpt / "checkpoint").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="made no progress"):
        wait_for_universal(ckpt, stall_s=0.3, poll_s=0.05)

    def convert() -> None:  # what rank 0 leaves, in the order it leaves it
        (ckpt / f"{TMP_PREFIX}1" / UNIVERSAL_TAG / "zero").mkdir(parents=True)
        (ckpt / f"{TMP_PREFIX}1" / UNIVERSAL_TAG / "zero" / "optimizer_state.pt").write_bytes(b"x")
        (ckpt / f"{TMP_PREFIX}1" / UNIVERSAL_TAG / "mp_rank_00_model_states.pt").write_bytes(b"x")
        (ckpt / f"{TMP_PREFIX}1" / UNIVERSAL_TAG).rename(ckpt / UNIVERSAL_TAG)
        (ckpt / POINTER).write_text(UNIVERSAL_TAG)

    timer = threading.Timer(0.2, convert)
    timer.start()
    assert wait_for_universal(ckpt, stall_s=30, poll_s=0.05) == ckpt / UNIVERSAL_TAG
    timer.join()
