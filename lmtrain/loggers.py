"""Metric sinks. metrics.jsonl is always written (one line per logging call, flushed, so a killed
run keeps every row it logged); CSV and TensorBoard on request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only


@dataclass
class LoggerConfig:
    csv: bool = False
    """Also write Lightning's metrics.csv under <run>/csv."""
    tensorboard: bool = False
    """Also write TensorBoard events under <run>/tensorboard."""


class JsonlLogger(Logger):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved config is written to <run>/config.yaml by the run itself

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def build_loggers(cfg: LoggerConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.csv:
        loggers.append(CSVLogger(run_dir, name="csv", version=""))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    return loggers


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; where a resumed run logged a step again, the later row wins."""
    by_key: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_key[(row["step"], tuple(sorted(k for k in row if k != "step")))] = row
    return sorted(by_key.values(), key=lambda r: r["step"])
