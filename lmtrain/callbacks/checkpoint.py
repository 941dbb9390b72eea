"""Step checkpoints: every N optimizer steps and at the end, keep the newest K, last.ckpt -> newest."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lmtrain.checkpoint.faults import maybe_kill
from lmtrain.checkpoint.files import list_step_checkpoints


def step_checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def point_last_at(directory: Path, target: Path) -> None:
    """last.ckpt -> target, replaced atomically (a temp link renamed over the old one)."""
    tmp = directory / f".last.ckpt.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, directory / "last.ckpt")


class StepCheckpoint(L.Callback):
    def __init__(self, directory: Path, *, every_n_steps: int, keep_last: int) -> None:
        self.directory, self.every_n_steps, self.keep_last = Path(directory), every_n_steps, keep_last
        self.last_saved_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last_saved_step = trainer.global_step  # resumed from there, or 0: nothing new to save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_saved_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        path = self.directory / step_checkpoint_name(step)
        trainer.save_checkpoint(path, weights_only=False)  # every rank takes part; the strategy writes on rank 0
        self.last_saved_step = step
        if trainer.is_global_zero:
            point_last_at(self.directory, path)
            for _, old in list_step_checkpoints(self.directory)[self.keep_last :]:
                old.unlink(missing_ok=True)
            rank_zero_info(f"checkpoint: {path}")
        trainer.strategy.barrier("lmtrain_checkpoint")
        maybe_kill("kill_after_checkpoint", step)
