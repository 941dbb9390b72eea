"""Metric sinks. metrics.jsonl is always written (one line per logging call, flushed, so a killed
run keeps every row it logged); CSV and TensorBoard on request."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lmtrain.distributed.rank import is_rank_zero


class WandbMode(Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    csv: bool = False
    """Also write Lightning's metrics.csv under <run>/csv."""
    tensorboard: bool = False
    """Also write TensorBoard events under <run>/tensorboard."""
    wandb: bool = False
    """Also stream to Weights & Biases (files under <run>/wandb)."""
    mode: WandbMode = WandbMode.auto
    """W&B: auto = online when an API key is configured (WANDB_API_KEY or `wandb login`), else offline
    (sync later with `wandb sync runs/<run>/wandb/offline-run-*`)."""
    project: str = "lmtrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    name: Optional[str] = None
    """W&B display name; None = the run name."""
    inspect_every_steps: int = 0
    """Every N optimizer steps, the `lmtrain inspect` views of inspect_text (attention maps, logit lens,
    surprisal; attributions for classify) under <run>/inspect/step-N/ and as images in W&B and
    TensorBoard; 0 = never."""
    inspect_text: str = ""
    """The fixed text those views are of, e.g. logger.inspect_text="def parse(" for a code model."""

    def __post_init__(self) -> None:
        if self.inspect_every_steps < 0:
            raise ValueError(f"logger.inspect_every_steps={self.inspect_every_steps} must be >= 0 (0 = never)")
        if self.inspect_every_steps > 0 and not self.inspect_text:
            raise ValueError(f"logger.inspect_every_steps={self.inspect_every_steps} but logger.inspect_text is empty; "
                             'set the text to inspect, e.g. logger.inspect_text="The cat sat on the mat."')


class JsonlLogger(Logger):
    """metrics.jsonl: one row per logging call. A resumed run first drops the rows after its
    checkpoint's step (the attempt that logged them died; the resumed run logs those steps again),
    so every step appears once."""

    def __init__(self, path: Path, resume_step: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        if is_rank_zero() and self.path.is_file():
            drop_rows_after(self.path, resume_step)

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


def drop_rows_after(path: Path, step: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def build_loggers(cfg: LoggerConfig, run_dir: Path, *, record: dict, wandb_run_id: str | None,
                  resume_step: int = 0) -> list[Logger]:
    loggers: list[Logger] = [JsonlLogger(run_dir / "metrics.jsonl", resume_step)]
    if cfg.csv:
        loggers.append(CSVLogger(run_dir, name="csv", version=""))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    if cfg.wandb and cfg.mode is not WandbMode.disabled:
        loggers.append(build_wandb_logger(cfg, run_dir, record=record, run_id=wandb_run_id, resume_step=resume_step))
    return loggers


WANDB_STATE = "wandb_state.json"  # {"run_id": ..., "last_step": ...}: one W&B run per lmtrain run


def wandb_mode(mode: WandbMode) -> str:
    if mode is not WandbMode.auto:
        return mode.value
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def new_wandb_run_id() -> str:
    return secrets.token_hex(4)  # W&B run ids are [a-z0-9]; 8 hex characters


def load_wandb_state(run_dir: Path) -> dict:
    path = run_dir / WANDB_STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def steps_in_offline_attempts(run_dir: Path, run_id: str, exclude: Path | None = None) -> int:
    """The highest trainer/global_step W&B wrote to disk in earlier offline attempts of this run
    (read with wandb's own reader); -1 when none. A SIGKILLed attempt can have written nothing:
    wandb buffers in its service process, which dies with the job."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    highest = -1
    for log in (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        if exclude is not None and exclude in log.parents:
            continue
        try:
            out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log)], capture_output=True,
                                 text=True, timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            if '"history"' in line:
                item = json.loads(line).get("history", {}).get("item", {})
                highest = max(highest, int(item.get("trainer/global_step", -1)))
    return highest


def build_wandb_logger(cfg: LoggerConfig, run_dir: Path, *, record: dict, run_id: str | None,
                       resume_step: int = 0) -> Logger:
    """A W&B run that survives resumes and requeues: its id comes from the checkpoint (or the run
    dir's wandb_state.json); W&B never sees a step twice or going backwards; and steps up to the
    checkpoint that W&B lost with a killed attempt are re-sent from metrics.jsonl, the durable record."""
    from lightning.pytorch.loggers import WandbLogger

    state = load_wandb_state(run_dir)
    run_id = run_id or state.get("run_id") or new_wandb_run_id()
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    mode = wandb_mode(cfg.mode)

    class ResumableWandbLogger(WandbLogger):
        _durable_step: int | None = None

        def durable_step(self) -> int:
            """What W&B already holds of this run: the server's summary online, the files offline."""
            if self._durable_step is None:
                run = self.experiment
                if mode == "online":
                    self._durable_step = int(run.summary.get("trainer/global_step", -1))
                else:
                    self._durable_step = steps_in_offline_attempts(run_dir, run_id, exclude=Path(run.dir).parent)
                for row in read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []:
                    if self._durable_step < row["step"] <= resume_step:  # lost, and not replayed after the resume
                        super().log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
            return self._durable_step

        @rank_zero_only
        def log_metrics(self, metrics, step=None):
            if step is not None and step <= self.durable_step():
                return  # W&B has it already: it never takes a step twice or going backwards
            super().log_metrics(metrics, step)
            if step is not None:
                (run_dir / WANDB_STATE).write_text(json.dumps({"run_id": run_id, "last_step": step}))

    config = {**record, "git_commit": git_commit()}
    return ResumableWandbLogger(name=cfg.name or run_dir.name, save_dir=str(run_dir), id=run_id, project=cfg.project,
                                entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None, mode=mode,
                                config=config, resume="allow")


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; where a resumed run logged a step again, the later row wins."""
    by_key: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_key[(row["step"], tuple(sorted(k for k in row if k != "step")))] = row
    return sorted(by_key.values(), key=lambda r: r["step"])
