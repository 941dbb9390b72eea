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
        directory of per-rank shards, made whole-or-absent by a rename."""
        self.directory, self.every_n_steps, self.keep_last = Path(directory), every_n_steps, keep_last
        self.layout = layout
        self.last_saved_step = -1

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
        if step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer)
        maybe_hold(step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        path = self.directory / step_checkpoint_name(step)
        if self.layout is not Layout.file:
            save_directory_atomically(trainer, path, step)
        else:
            trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; the strategy writes on rank 0
        self.last_saved_step = step
        if trainer.is_global_zero:
            point_last_at(self.directory, path)
            for _, old in list_step_checkpoints(self.directory)[self.keep_last :]:
                remove_path(old)
            rank_zero_info(f"checkpoint: {path}")
        trainer.strategy.barrier("lmtrain_checkpoint")
        maybe_kill("kill_after_checkpoint", step)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_directory_atomically(trainer: L.Trainer, path: Path, step: int) -> None:
    """Sharded writers fill a directory in place; write it under a temp name (the same on every
    rank), then rank 0 renames it once every shard is down."""
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{step}")
    trainer.save_checkpoint(tmp, weights_only=False)
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
