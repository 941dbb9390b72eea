"""Task heads that read a Transformer's final hidden states, and how a sequence is pooled."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmtrain.tasks.config import Pooling


class LinearHead(nn.Module):
    """Dropout then one linear layer: d_model -> n_outputs (class logits, or start/end logits)."""

    def __init__(self, d_model: int, n_outputs: int, *, dropout: float, init_std: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, n_outputs)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.dropout(x)).float()


def resolve_pooling(pooling: Pooling, causal: bool) -> Pooling:
    if pooling is Pooling.auto:
        return Pooling.last if causal else Pooling.first
    return pooling


def pool(hidden: Tensor, mask: Tensor, pooling: Pooling) -> Tensor:
    """hidden (B, T, D), mask (B, T) True at real tokens -> (B, D)."""
    match pooling:
        case Pooling.first:
            return hidden[:, 0]
        case Pooling.last:
            last = mask.long().sum(1) - 1  # right padding: the last real token
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        case Pooling.mean:
            weights = mask.to(hidden.dtype)[..., None]
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    raise ValueError(f"task.pooling={pooling} must be resolved (first, last or mean) before pooling")
