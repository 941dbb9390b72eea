"""Step checkpoints: every N optimizer steps and at the end, keep the newest K, last.ckpt names the newest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lmtrain.checkpoint.faults import maybe_hold, maybe_kill
from lmtrain.checkpoint.files import list_step_checkpoints, write_pointer
from lmtrain.checkpoint.formats import Layout
from lmtrain.checkpoint.io import TMP_MARKER, fsync_dir


def step_checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def point_last_at(directory: Path, target: Path) -> None:
    """last.ckpt := a small file naming target (not a symlink: object-store mounts have none)."""
    write_pointer(directory, target)


class StepCheckpoint(L.Callback):
    def __init__(self, directory: Path, *, every_n_steps: int, keep_last: int, layout: Layout = Layout.file) -> None:
        """layout: the strategy's (ParallelPlan.checkpoint_layout); DeepSpeed and FSDP2 (DCP) write a
        directory of per-rank shards under a temp name, published (renamed) once every shard is down.

        With a strategy that writes in the background (FSDP2, strategy.async_save) the publishing waits
        for every rank's write: the ranks agree on it without blocking, one step after they started an
        all-reduce of "done" at a step boundary; the next checkpoint, the end of training and a stop
        on a signal publish (waiting if need be) before anything else."""
        self.directory, self.every_n_steps, self.keep_last = Path(directory), every_n_steps, keep_last
        self.layout = layout
        self.last_saved_step = -1
        self._in_flight: tuple[Path, Path, int] | None = None  # (temp dir, final path, step) not yet published
        self._done_vote = None  # (work, flag): the all-reduce of "my write is done" started at the last boundary
        self._group = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and writes_in_background(trainer) and self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_saved_step = trainer.global_step  # resumed from there, or 0: nothing new to save
        # Every rank chose its checkpoint alone (run dirs on different filesystems, a late NFS view):
        # a disagreement would diverge silently, so it ends the job here with what each rank saw.
        steps = trainer.strategy.all_gather(torch.tensor(trainer.global_step, device=pl_module.device))
        steps = [int(s) for s in torch.atleast_1d(steps)]
        if len(set(steps)) > 1:
            raise RuntimeError(f"ranks resumed from different steps {steps}: the run dir {self.directory.parent} must "
                               "be one directory on a filesystem every node sees")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._in_flight is not None and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._publish_when_written(trainer)
        if step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer)
        maybe_hold(step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_saved_step:
            self.save(trainer)
        self.finish(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Checkpoint this step; every rank takes part."""
        self.finish(trainer)
        step = trainer.global_step
        path = self.directory / step_checkpoint_name(step)
        self.last_saved_step = step
        if self.layout is Layout.file:
            trainer.save_checkpoint(path, weights_only=False)  # the strategy writes on rank 0
            self._published(trainer, path, step)
            return
        tmp = path.with_name(f"{path.name}{TMP_MARKER}{step}")  # the same on every rank
        trainer.save_checkpoint(tmp, weights_only=False)
        self._in_flight = (tmp, path, step)
        if not writes_in_background(trainer):
            self.finish(trainer)

    def finish(self, trainer: L.Trainer) -> None:
        """Publish the checkpoint being written, once every rank's write is down (waiting for it)."""
        if self._done_vote is not None:
            self._done_vote[0].wait()  # every rank started it: it completes without anyone waiting long
            self._done_vote = None
        if self._in_flight is None:
            return
        tmp, path, step = self._in_flight
        self._in_flight = None
        if writes_in_background(trainer):
            trainer.strategy.wait_for_save()
        publish_directory(trainer, tmp, path, step)
        self._published(trainer, path, step)

    def _publish_when_written(self, trainer: L.Trainer) -> None:
        """At a step boundary: publish if every rank said its write was done at the boundary before;
        else start asking again."""
        if self._group is None:  # one rank: nobody else to ask
            if trainer.strategy.save_done():
                self.finish(trainer)
            return
        if self._done_vote is not None:
            work, done = self._done_vote
            self._done_vote = None
            work.wait()
            if done.item():
                self.finish(trainer)
                return
        done = torch.tensor([int(trainer.strategy.save_done())], dtype=torch.int32)
        work = torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN, group=self._group, async_op=True)
        self._done_vote = (work, done)

    def _published(self, trainer: L.Trainer, path: Path, step: int) -> None:
        if trainer.is_global_zero:
            point_last_at(self.directory, path)
            for _, old in list_step_checkpoints(self.directory)[self.keep_last :]:
                remove_path(old)
            rank_zero_info(f"checkpoint: {path}")
        trainer.strategy.barrier("lmtrain_checkpoint")
        maybe_kill("kill_after_checkpoint", step)


def writes_in_background(trainer: L.Trainer) -> bool:
    return bool(getattr(trainer.strategy, "async_save", False))


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_directory(trainer: L.Trainer, tmp: Path, path: Path, step: int) -> None:
    """Sharded writers fill a directory under a temp name (the same on every rank); rank 0 renames it
    once every rank's shards are down."""
    # Every rank flushes what it can see (its own shards on a node-local cache) before the rename.
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    trainer.strategy.barrier("lmtrain_checkpoint_shards")
    if trainer.is_global_zero:
        maybe_kill("kill_during_checkpoint_write", step)
        remove_path(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
