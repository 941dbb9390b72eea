"""Optimizer and learning-rate schedule: plain PyTorch, configured by `optim` and `schedule`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

import torch
from torch import nn


class OptimKind(Enum):
    adamw = "adamw"


class ScheduleKind(Enum):
    cosine = "cosine"
    wsd = "wsd"
    constant = "constant"


@dataclass
class OptimConfig:
    kind: OptimKind = OptimKind.adamw
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases or embeddings."""
    fused: Optional[bool] = None
    """Fused AdamW kernel; None = use it where the device supports it (CUDA)."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"optim.{name}={value} must be in [0, 1); typical values are 0.9 and 0.95")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class ScheduleConfig:
    kind: ScheduleKind = ScheduleKind.cosine
    warmup_steps: Optional[int] = None
    """Linear warmup from 0 over this many optimizer steps; None = min(100, trainer.max_steps // 5), so
    a short run still spends most of its steps at optim.lr. Must be below trainer.max_steps."""
    min_lr_ratio: float = 0.1
    """The floor of the decay, as a fraction of optim.lr."""
    decay_fraction: float = 0.2
    """wsd: the last fraction of training spent decaying linearly to the floor."""

    def resolved_warmup_steps(self, max_steps: int) -> int:
        return min(100, max_steps // 5) if self.warmup_steps is None else self.warmup_steps

    def warmup_warning(self, max_steps: int) -> str | None:
        """A warning when the warmup never ends: the whole run below optim.lr."""
        if self.warmup_steps is None or self.warmup_steps < max_steps:
            return None
        return (f"warning: schedule.warmup_steps={self.warmup_steps} is not below trainer.max_steps={max_steps}: the run "
                f"ends before the learning rate reaches optim.lr (it peaks at {max_steps / (self.warmup_steps + 1):.0%} "
                f"of it). Lower schedule.warmup_steps (e.g. {max_steps // 5}), or leave it unset (null: min(100, max_steps // 5))")

    def __post_init__(self) -> None:
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"schedule.decay_fraction={self.decay_fraction} must be in (0, 1]")


def split_decay_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None,
                       depth_of: Callable[[str], int] | None = None, layer_lr_decay: float = 1.0) -> list[dict]:
    """Parameter groups: matrices decay; norms, biases and embeddings do not.

    With depth_of (parameter name -> depth below the top, 0 = the head), each depth gets its own
    groups at lr * layer_lr_decay**depth (layer-wise LR decay, as in ELECTRA and BEiT fine-tuning);
    the depth is kept in each group as "lr_depth" so a resume can recompute the LRs from the config.
    Frozen parameters (requires_grad=False) are left out.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[int, bool], list] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied weight appears once
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partitioned parameter's data is empty; ds_shape is its own
        decays = len(shape) >= 2 and id(p) not in embedding_ids
        depth = depth_of(name) if depth_of else 0
        groups.setdefault((depth, decays), []).append(p)
    result = []
    for depth in sorted({d for d, _ in groups}):
        for decays in (True, False):  # the decay group first: the order checkpoints were written in
            group = {"params": groups.get((depth, decays), []), "weight_decay": weight_decay if decays else 0.0,
                     "lr_depth": depth}
            if lr is not None:
                group["lr"] = lr * layer_lr_decay**depth
            if group["params"] or depth_of is None:
                result.append(group)
    return result


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, depth_of: Callable[[str], int] | None = None,
                    layer_lr_decay: float = 1.0) -> torch.optim.Optimizer:
    groups = split_decay_groups(model, cfg.weight_decay, lr=cfg.lr, depth_of=depth_of, layer_lr_decay=layer_lr_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("no trainable parameters: every parameter is frozen (task.freeze_backbone=true with no head?)")
    match cfg.kind:
        case OptimKind.adamw:
            on_cuda = params[0].is_cuda
            fused = on_cuda if cfg.fused is None else cfg.fused
            return torch.optim.AdamW(
                groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused
            )
    raise ValueError(f"optim.kind={cfg.kind} is not supported; choose one of {[k.name for k in OptimKind]}")


class LRMultiplier:
    """lr(step) / peak lr, stepped once per optimizer step."""

    def __init__(self, cfg: ScheduleConfig, max_steps: int) -> None:
        self.kind = cfg.kind.value
        self.warmup_steps = cfg.resolved_warmup_steps(max_steps)
        self.max_steps = max_steps
        self.min_lr_ratio = cfg.min_lr_ratio
        self.decay_steps = max(1, round(cfg.decay_fraction * max_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        floor = self.min_lr_ratio
        match self.kind:
            case "constant":
                return 1.0
            case "cosine":
                span = max(1, self.max_steps - self.warmup_steps)
                progress = min(1.0, (step - self.warmup_steps) / span)
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
            case "wsd":
                decay_start = self.max_steps - self.decay_steps
                if step < decay_start:
                    return 1.0
                progress = min(1.0, (step - decay_start) / self.decay_steps)
                return 1.0 - (1.0 - floor) * progress
        raise ValueError(f"schedule.kind={self.kind!r} is not supported; choose one of {[k.name for k in ScheduleKind]}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int):
    multiplier = LRMultiplier(cfg, max_steps)
    # Wrapped in a plain function so LambdaLR does not save (and on resume restore) the
    # multiplier's settings: the schedule always follows the current config, so a resumed run
    # with a larger trainer.max_steps re-plans its decay instead of staying on the old one.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: multiplier(step))
