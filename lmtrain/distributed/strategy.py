"""Build the Lightning strategy named by `strategy`."""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy, Strategy

from lmtrain.distributed.config import Family, StrategyConfig, StrategyKind
from lmtrain.distributed.deepspeed import build_deepspeed_strategy
from lmtrain.distributed.fsdp import build_fsdp_strategy
from lmtrain.distributed.parallelize import resolve_kind

__all__ = ["build_strategy", "resolve_kind"]


def build_strategy(cfg: StrategyConfig, *, world_size: int, devices_per_node: int, micro_batch_size: int,
                   grad_clip: float, on_cpu: bool, load_universal: bool = False) -> Strategy | str:
    """load_universal: (DeepSpeed) the run resumes a checkpoint converted to DeepSpeed's universal
    checkpoint because another number of ranks wrote it (lmtrain.checkpoint.universal)."""
    kind = resolve_kind(cfg, world_size)
    match kind:
        case StrategyKind.single:
            if world_size > 1:
                raise ValueError(
                    f"strategy=single runs one process, but trainer.devices x trainer.num_nodes = {world_size}; "
                    "use strategy=ddp (or auto)"
                )
            return "auto"  # Lightning picks the single device of the chosen accelerator
        case StrategyKind.ddp:
            # broadcast_buffers=False: the model's buffers are constants every rank computes alike (rotary and
            # sinusoidal tables), and the task's buffers are per-rank accumulators (the train loss window, the
            # first non-finite step) that rank 0's copies must not overwrite before every forward; it also
            # saves a collective per micro batch.
            return DDPStrategy(find_unused_parameters=cfg.find_unused_parameters, broadcast_buffers=False,
                               timeout=timedelta(seconds=cfg.timeout_s))
        case StrategyKind.fsdp:
            # FSDP2 (fully_shard per block, applied by TaskModule.configure_model through
            # lmtrain.distributed.parallelize, which also builds the hybrid-sharding mesh).
            return build_fsdp_strategy(world_size=world_size, timeout_s=cfg.timeout_s, async_save=cfg.async_save)
        case _ if kind.family is Family.deepspeed:
            return build_deepspeed_strategy(cfg, micro_batch_size=micro_batch_size, grad_clip=grad_clip, on_cpu=on_cpu,
                                            load_universal=load_universal)
    raise ValueError(f"strategy.kind={cfg.kind} is not supported; choose one of {[k.name for k in StrategyKind]}")
