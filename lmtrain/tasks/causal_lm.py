"""Causal language modelling: next-token cross entropy over packed windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmtrain.tasks.base import TaskModule, gather_rank_states, restore_rng_state, step_seed, uses_deepspeed

__all__ = ["CausalLMTask", "gather_rank_states", "restore_rng_state", "step_seed", "uses_deepspeed"]


class CausalLMTask(TaskModule):
    """Batches are packed windows (B, T + 1) int64: inputs [:, :-1], targets [:, 1:]."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def compute_loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        logits = self.model(inputs)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)

    def training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self.compute_loss(batch)

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum.zero_()
        self._val_tokens.zero_()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._val_loss_sum += self.compute_loss(batch, reduction="sum").double()
        self._val_tokens += float(batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        loss_sum = self.trainer.strategy.reduce(self._val_loss_sum.clone(), reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens.clone(), reduce_op="sum")
        loss = (loss_sum / tokens.clamp(min=1)).item()
        self.last_val = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
