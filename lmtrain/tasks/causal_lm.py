"""Causal language modelling: next-token cross entropy over packed windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmtrain.tasks.base import TaskModule, gather_rank_states, restore_rng_state, step_seed

__all__ = ["CausalLMTask", "gather_rank_states", "restore_rng_state", "step_seed"]


class CausalLMTask(TaskModule):
    """Batches are packed windows (B, T + 1) int64: inputs [:, :-1], targets [:, 1:].
    loss_chunk_tokens > 0: the training loss is computed that many tokens at a time (see
    `Transformer.chunked_loss_sum`)."""

    def __init__(self, *args, loss_chunk_tokens: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def compute_loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        logits = self.model(inputs)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)

    def training_loss(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.loss_chunk_tokens:
            return self.compute_loss(batch)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        return self.model(inputs, targets=targets, loss_chunk=self.loss_chunk_tokens) / targets.numel()

    def on_validation_epoch_start(self) -> None:
        self.start_source_val()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids = batch["ids"]
        logits = self.model(ids[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        self.add_source_val(batch["source"], losses.view(len(ids), -1).sum(1), torch.full_like(losses[: len(ids)], ids.shape[1] - 1))

    def on_validation_epoch_end(self) -> None:
        self.last_val = self.source_val_losses()
        self.last_val["val/ppl"] = math.exp(min(self.last_val["val/loss"], 50.0))
