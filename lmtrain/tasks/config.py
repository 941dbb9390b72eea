from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class TaskKind(Enum):
    causal_lm = "causal_lm"


@dataclass
class TaskConfig:
    kind: TaskKind = TaskKind.causal_lm
