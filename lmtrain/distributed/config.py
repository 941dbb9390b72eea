from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional


class Family(Enum):
    """Who holds the model and runs the step."""

    replicated = "replicated"
    """One process, or DDP: every rank holds the whole model; torch's optimizer; autocast mixed precision."""
    deepspeed = "deepspeed"
    """DeepSpeed's engine: 16-bit model, fp32 master weights in its optimizer, clipping inside the engine."""
    fsdp = "fsdp"
    """FSDP2: sharded fp32 weights, mixed precision by its own policy (Lightning runs 32-true)."""


class StrategyKind(Enum):
    auto = "auto"
    single = "single"
    ddp = "ddp"
    deepspeed_zero1 = "deepspeed_zero1"
    deepspeed_zero2 = "deepspeed_zero2"
    deepspeed_zero3 = "deepspeed_zero3"
    deepspeed_zero3_offload = "deepspeed_zero3_offload"
    fsdp = "fsdp"

    # What each strategy is, asked of the kind, never matched on names elsewhere.
    @property
    def family(self) -> Family:
        if self.zero_stage is not None:
            return Family.deepspeed
        return Family.fsdp if self is StrategyKind.fsdp else Family.replicated

    @property
    def zero_stage(self) -> int | None:
        return {StrategyKind.deepspeed_zero1: 1, StrategyKind.deepspeed_zero2: 2, StrategyKind.deepspeed_zero3: 3,
                StrategyKind.deepspeed_zero3_offload: 3}.get(self)

    @property
    def shards_parameters(self) -> bool:
        """No rank ever holds every parameter (FSDP, ZeRO-3): the model can be built without them (meta init)."""
        return self is StrategyKind.fsdp or self.zero_stage == 3

    @property
    def engine_clips(self) -> bool:
        """The engine clips gradients itself (DeepSpeed's gradient_clipping), not the task."""
        return self.family is Family.deepspeed

    @property
    def checkpoint_layout(self):
        """lmtrain.checkpoint.Layout: one file (replicated), DeepSpeed's directory, or a DCP directory (FSDP2)."""
        from lmtrain.checkpoint.formats import Layout

        return {Family.replicated: Layout.file, Family.deepspeed: Layout.deepspeed, Family.fsdp: Layout.dcp}[self.family]


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
    async_save: bool = False
    """FSDP: write checkpoints in the background. Each rank copies its shards to CPU memory (a pause of
    that copy), training goes on while a thread writes them, and the checkpoint becomes step-N.ckpt and
    last.ckpt at the first step boundary after every rank has finished (whole or absent, as always)."""
    meta_init: bool = True
    """FSDP and ZeRO-3: build the model on the meta device, shard it, then initialise each rank's shards
    (the same weights as an unsharded build, without any rank ever holding the whole fp32 model)."""

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
        return self.kind.zero_stage
