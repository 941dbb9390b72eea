"""Build the Lightning strategy named by `strategy`."""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy

from lmtrain.distributed.config import StrategyConfig, StrategyKind


def build_strategy(cfg: StrategyConfig, *, world_size: int) -> Strategy | str:
    kind = cfg.kind
    if kind is StrategyKind.auto:
        kind = StrategyKind.ddp if world_size > 1 else StrategyKind.single
    match kind:
        case StrategyKind.single:
            if world_size > 1:
                raise ValueError(
                    f"strategy=single runs one process, but trainer.devices x trainer.num_nodes = {world_size}; "
                    "use strategy=ddp (or auto)"
                )
            return "auto"  # Lightning picks the single device of the chosen accelerator
        case StrategyKind.ddp:
            return DDPStrategy(
                find_unused_parameters=cfg.find_unused_parameters,
                timeout=timedelta(seconds=cfg.timeout_s),
            )
    raise ValueError(f"strategy.kind={cfg.kind} is not supported; choose one of {[k.name for k in StrategyKind]}")
