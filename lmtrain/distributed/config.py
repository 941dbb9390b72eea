from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional


class StrategyKind(Enum):
    auto = "auto"
    single = "single"
    ddp = "ddp"
    deepspeed_zero1 = "deepspeed_zero1"
    deepspeed_zero2 = "deepspeed_zero2"
    deepspeed_zero3 = "deepspeed_zero3"
    deepspeed_zero3_offload = "deepspeed_zero3_offload"
    fsdp = "fsdp"


class ShardingKind(Enum):
    full = "full"
    """FSDP: shard over every rank (ZeRO-3 style)."""
    hybrid = "hybrid"
    """FSDP: shard within a node, replicate across nodes (less inter-node traffic)."""


@dataclass
class StrategyConfig:
    kind: StrategyKind = StrategyKind.auto
    """auto: one device -> single, several -> ddp."""
    find_unused_parameters: bool = False
    """DDP: only for models with parameters that some steps do not use."""
    timeout_s: int = 1800
    """Collective timeout: a rank that never arrives ends the job instead of hanging it."""
    peer_timeout_s: int = 60
    """A rank not heard from for this long (its node died, froze or lost the network) ends every other
    rank at once, instead of strategy.timeout_s later (lmtrain.distributed.watchdog); 0 = off."""
    reduce_bucket_size: int = 200_000_000
    """DeepSpeed: elements per gradient reduce bucket."""
    allgather_bucket_size: int = 200_000_000
    """DeepSpeed ZeRO-1/2: elements per parameter all-gather bucket."""
    prefetch_bucket_size: int = 50_000_000
    """DeepSpeed ZeRO-3: elements of parameters prefetched ahead of use."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON whose keys override the config lmtrain generates (keys lmtrain owns — micro
    batch, accumulation, clipping, precision — must agree with lmtrain's settings)."""
    sharding: ShardingKind = ShardingKind.full
    """FSDP: full or hybrid sharding."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (less memory, one more all-gather in backward)."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"strategy.timeout_s={self.timeout_s} must be > 0")
        if self.peer_timeout_s < 0:
            raise ValueError(f"strategy.peer_timeout_s={self.peer_timeout_s} must be >= 0 (0 turns the watchdog off)")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"strategy.{name}={getattr(self, name)} must be > 0")

    @property
    def zero_stage(self) -> int | None:
        return {StrategyKind.deepspeed_zero1: 1, StrategyKind.deepspeed_zero2: 2, StrategyKind.deepspeed_zero3: 3,
                StrategyKind.deepspeed_zero3_offload: 3}.get(self.kind)
