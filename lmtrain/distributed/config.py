from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StrategyKind(Enum):
    auto = "auto"
    single = "single"
    ddp = "ddp"


@dataclass
class StrategyConfig:
    kind: StrategyKind = StrategyKind.auto
    """auto: one device -> single, several -> ddp."""
    find_unused_parameters: bool = False
    """DDP: only for models with parameters that some steps do not use."""
    timeout_s: int = 1800
    """Collective timeout: a rank that never arrives ends the job instead of hanging it."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"strategy.timeout_s={self.timeout_s} must be > 0")
