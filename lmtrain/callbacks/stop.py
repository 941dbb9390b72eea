"""Stopping on a signal: SIGTERM, and under SLURM the requeue signal, end a run at an optimizer-step
boundary that every rank agrees on, with a checkpoint of that step.

The handlers only record the signal: saving inside a handler can capture a half-done step. The
ranks agree on what was received without a blocking collective per step: at each boundary every
rank starts an asynchronous all-reduce (MAX, on a small gloo group, CPU tensors: no device sync)
of its flags and reads the one it started at the boundary before, which every rank has long
joined (each has since taken part in a step's gradient reduction). So the ranks act on the same
values at the same step, one step after the signal reached any of them, whichever rank that was.
One rank acts at once.

This replaces Lightning's SIGTERM path, which broadcasts a flag from rank 0 before every micro
batch (a blocking collective and host sync), broadcasts again from inside its signal handler, and
lets a rank other than 0 that received the signal stop alone.

On the agreed step: the requeue signal saves, runs `scontrol requeue` (rank 0) and exits 0 (3 when
the job was not requeued); SIGTERM saves and stops (`lmtrain train` then exits 143, saying where).
Repeated signals change nothing (srun forwards the SIGTERM a task may also get from slurmstepd);
SIGKILL ends a process at once.
"""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lmtrain.callbacks.checkpoint import StepCheckpoint
from lmtrain.distributed import preemption


class RequeueExit(SystemExit):
    """The documented end of an attempt under SLURM: 0 when the job was requeued, 3 when not."""


class StopOnSignal(L.Callback):
    def __init__(self, checkpoint: StepCheckpoint | None, *, requeue_signum: int | None, max_requeues: int = 0) -> None:
        """requeue_signum: the SLURM requeue signal (None outside a SLURM step: SIGTERM only)."""
        self.checkpoint, self.requeue_signum, self.max_requeues = checkpoint, requeue_signum, max_requeues
        self._signums = [signal.SIGTERM] + ([requeue_signum] if requeue_signum is not None else [])
        if requeue_signum is not None:
            preemption.install(requeue_signum)  # usually already installed by the CLI; a signal received before is kept
        self._group = None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and self._group is None:
            # Its own group: the flag's reduction never queues behind (or ahead of) the strategy's collectives.
            self._group = dist.new_group(backend="gloo")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning has just installed its SIGTERM handler (it restores the previous one at teardown);
        # ours replaces it, and its per-micro-batch broadcast goes.
        preemption.install(signal.SIGTERM)
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only at an optimizer-step boundary
        local = torch.tensor([int(preemption.received(s)) for s in self._signums], dtype=torch.int32)
        agreed = local if self._group is None else self._collect()
        if agreed is None or not agreed.any():
            if self._group is not None:
                self._pending = (dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._group, async_op=True), local)
            return
        if self.requeue_signum is not None and agreed[1]:
            self._requeue(trainer)
        self._stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._collect()  # every rank started it: it completes without anyone waiting

    def _collect(self) -> torch.Tensor | None:
        """The flags agreed at the boundary before (None at the first)."""
        if self._pending is None:
            return None
        work, flags = self._pending
        self._pending = None
        work.wait()
        return flags

    def _save(self, trainer: L.Trainer) -> None:
        if self.checkpoint is None:
            return
        if self.checkpoint.last_saved_step != trainer.global_step:
            self.checkpoint.save(trainer)
        self.checkpoint.finish(trainer)  # a checkpoint written in the background is published before the exit

    def _requeue(self, trainer: L.Trainer) -> None:
        rank_zero_info(f"{signal.Signals(self.requeue_signum).name} received: saving at step {trainer.global_step}, "
                       "then requeueing")
        self._save(trainer)
        requeued = requeue_job(trainer.is_global_zero, self.max_requeues)
        trainer.strategy.barrier("lmtrain_requeue")
        raise RequeueExit(0 if requeued else 3)

    def _stop(self, trainer: L.Trainer) -> None:
        rank_zero_info(f"SIGTERM received: saving at step {trainer.global_step}, then stopping")
        self._save(trainer)
        trainer.strategy.barrier("lmtrain_sigterm")
        raise SIGTERMException()


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
