"""Preemption and time limits under SLURM: finish the step, checkpoint, requeue, exit.

SLURM sends the configured signal (`--signal=USR1@<grace>`, or `scancel --signal=USR1`) to every
task. The handler only sets a flag: saving inside a signal handler can capture a half-done step
(Lightning's default does). At the next optimizer-step boundary the ranks agree on the flag (one
collective), save a normal step checkpoint, rank 0 runs `scontrol requeue`, and the job exits;
the requeued job resumes from that checkpoint in the same run dir (resume=auto).
"""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lmtrain.callbacks.checkpoint import StepCheckpoint
from lmtrain.distributed.preemption import install, received


class RequeueExit(SystemExit):
    """The documented end of an attempt under SLURM: 0 when the job was requeued, 3 when not."""


class RequeueOnSignal(L.Callback):
    def __init__(self, checkpoint: StepCheckpoint, *, signum: int, max_requeues: int) -> None:
        self.checkpoint, self.signum, self.max_requeues = checkpoint, signum, max_requeues
        install(signum)  # usually already installed by the CLI; a signal received before is kept

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only at an optimizer-step boundary
        flag = torch.tensor(int(received(self.signum)), device=pl_module.device)
        if int(trainer.strategy.reduce(flag, reduce_op="max").item()) == 0:
            return
        step = trainer.global_step
        rank_zero_info(f"{signal.Signals(self.signum).name} received: saving at step {step}, then requeueing")
        if self.checkpoint.last_saved_step != step:
            self.checkpoint.save(trainer)
        requeued = requeue_job(trainer.is_global_zero, self.max_requeues)
        trainer.strategy.barrier("lmtrain_requeue")
        raise RequeueExit(0 if requeued else 3)


def requeue_job(is_rank_zero: bool, max_requeues: int) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if job is None:
        return False
    if restarts >= max_requeues:
        rank_zero_info(f"not requeueing: job {job} was already requeued {restarts} times (cluster.max_requeues)")
        return False
    if is_rank_zero:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if out.returncode != 0:
            rank_zero_info(f"scontrol requeue {job} failed: {out.stderr.strip()}")
            return False
        rank_zero_info(f"requeued job {job} (restart {restarts + 1}); it resumes from the checkpoint just written")
    return True
