"""`lmtrain sweep`: a Bayesian hyperparameter search whose study outlives any one process.

An Optuna study (TPE sampler, median pruner) lives in `<sweeps_dir>/<name>/study.db` (SQLite). Each
trial is an ordinary `lmtrain train` run, `runs/trial-<n>` under the sweep dir, started locally
(sequentially or N at a time) or as a SLURM job through `lmtrain submit` (multi-GPU, requeueable,
auto-resumed like any other run). The driver only launches, watches the run's metrics.jsonl for
intermediate values (pruning), and records results. Killed and rerun, it continues: finished
trials are kept, trials that were running are relaunched under the same run name, so they resume
from their own checkpoints, and new trials fill the budget.

Why not Hydra's Optuna sweeper: it pins optuna 2.10 and SQLAlchemy 1.4 and runs trials inside the
sweeping process, so a trial cannot be a multi-GPU job and an interrupted sweep loses its running
trials. Here trials are processes or cluster jobs, and current Optuna's storage holds the study.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

from lmtrain.loggers import read_metrics


class LauncherKind(Enum):
    local = "local"
    slurm = "slurm"


@dataclass
class SweepSpec:
    name: str = "sweep"
    n_trials: int = 8
    metric: str = "val/loss"
    """The objective: the last value of this metric in the trial's metrics.jsonl."""
    direction: str = "minimize"
    params: List[str] = field(default_factory=list)
    """'key: loguniform(lo, hi)' | 'key: uniform(lo, hi)' | 'key: int(lo, hi)' | 'key: choice(a, b, ...)'."""
    overrides: List[str] = field(default_factory=list)
    """`lmtrain train` overrides shared by every trial."""
    pruner: str = "median"
    """median: stop a trial whose intermediate metric is worse than the median of earlier trials at that step; none."""
    n_startup_trials: int = 3
    seed: int = 0
    sweeps_dir: str = "sweeps"

    def __post_init__(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"sweep.direction={self.direction!r} is not minimize or maximize")
        if self.pruner not in ("median", "none"):
            raise ValueError(f"sweep.pruner={self.pruner!r} is not median or none")
        if self.n_trials <= 0:
            raise ValueError(f"sweep.n_trials={self.n_trials} must be > 0")
        for spec in self.params:
            parse_param(spec)


@dataclass
class LauncherConfig:
    kind: LauncherKind = LauncherKind.local
    parallel: int = 1
    """Trials running at once (local: processes on this machine; slurm: jobs in the queue)."""
    submit_overrides: List[str] = field(default_factory=list)
    """slurm: extra `lmtrain submit` options, e.g. ['cluster=mysite', 'slurm.nodes=2', 'slurm.gpus_per_node=8']."""
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if self.parallel <= 0:
            raise ValueError(f"launcher.parallel={self.parallel} must be > 0")


@dataclass
class SweepConfig:
    sweep: SweepSpec = field(default_factory=SweepSpec)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    command: Optional[str] = None
    """How trials start lmtrain; None = this interpreter (`python -m lmtrain`)."""


# A job that requeues itself shows FAILED until its step has been torn down, which can take
# srun's step-kill wait (about 30 s) on a loaded node; measured here: over 10 s once.
FINAL_STATE_HOLD_S = 45.0

PARAM = re.compile(r"^\s*([\w.]+)\s*:\s*(loguniform|uniform|int|choice)\((.*)\)\s*$")


def parse_param(spec: str):
    """'optim.lr: loguniform(1e-4, 1e-2)' -> (key, optuna distribution)."""
    import optuna.distributions as d

    m = PARAM.match(spec)
    if not m:
        raise ValueError(f"sweep.params entry {spec!r} is not 'key: loguniform|uniform|int|choice(...)'")
    key, kind, args = m.group(1), m.group(2), [a.strip() for a in m.group(3).split(",") if a.strip()]
    match kind:
        case "loguniform" | "uniform":
            lo, hi = float(args[0]), float(args[1])
            return key, d.FloatDistribution(lo, hi, log=kind == "loguniform")
        case "int":
            return key, d.IntDistribution(int(args[0]), int(args[1]))
        case "choice":
            return key, d.CategoricalDistribution([_literal(a) for a in args])


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip("'\"")


@dataclass
class Running:
    number: int
    trial_id: int
    params: dict
    run_dir: Path
    handle: object  # subprocess.Popen (local) or a SLURM job id (slurm)
    reported: int = -1
    final_seen: float | None = None  # slurm: when a final state was first seen


class Sweep:
    def __init__(self, cfg: SweepConfig) -> None:
        import optuna

        self.cfg, self.spec, self.launcher = cfg, cfg.sweep, cfg.launcher
        if not self.spec.params:
            raise ValueError("sweep.params is empty: name at least one, e.g. 'optim.lr: loguniform(1e-4, 1e-2)'")
        self.dir = Path(self.spec.sweeps_dir).expanduser().resolve() / self.spec.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.distributions = dict(parse_param(p) for p in self.spec.params)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=self.spec.n_startup_trials) if self.spec.pruner == "median" \
            else optuna.pruners.NopPruner()
        self.study = optuna.create_study(
            study_name=self.spec.name, storage=f"sqlite:///{self.dir / 'study.db'}", direction=self.spec.direction,
            sampler=optuna.samplers.TPESampler(seed=self.spec.seed, n_startup_trials=self.spec.n_startup_trials),
            pruner=pruner, load_if_exists=True)
        self.running: list[Running] = []

    # -- launching ----------------------------------------------------------------------------
    def trial_args(self, params: dict, number: int) -> list[str]:
        values = [f"{k}={v}" for k, v in params.items()]
        return [*self.spec.overrides, *values, f"runs_dir={self.dir / 'runs'}", f"run_name=trial-{number}"]

    def command(self) -> list[str]:
        return self.cfg.command.split() if self.cfg.command else [sys.executable, "-m", "lmtrain"]

    def launch(self, trial_id: int, number: int, params: dict) -> None:
        run_dir = self.dir / "runs" / f"trial-{number}"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        resumed = run_dir.exists()
        match self.launcher.kind:
            case LauncherKind.local:
                log = open(self.dir / "runs" / f"trial-{number}.log", "a")
                handle = subprocess.Popen([*self.command(), "train", *self.trial_args(params, number)],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            case LauncherKind.slurm:
                out = subprocess.run([*self.command(), "submit", *self.trial_args(params, number),
                                      *self.launcher.submit_overrides], capture_output=True, text=True)
                if out.returncode != 0:
                    raise ValueError(f"lmtrain submit for trial {number} failed: {out.stderr.strip()[-2000:]}")
                handle = out.stdout.split("submitted job ")[1].split(";")[0]
        self.running.append(Running(number, trial_id, params, run_dir, handle))
        self.record(number, params, None, "RUNNING", run_dir)
        print(f"trial {number}: {'resumed' if resumed else 'started'} {params}", flush=True)

    def finished_code(self, r: Running) -> int | None:
        """None while running; else 0 for success, non-zero for failure."""
        match self.launcher.kind:
            case LauncherKind.local:
                return r.handle.poll()
            case LauncherKind.slurm:
                out = subprocess.run(["scontrol", "-o", "show", "job", str(r.handle)], capture_output=True, text=True)
                state = dict(re.findall(r"(\w+)=(\S*)", out.stdout)).get("JobState", "")
                if state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", ""):
                    r.final_seen = None
                    return None if state or out.returncode == 0 else 1
                if state == "COMPLETED":
                    return 0  # never requeued after this
                # A job that requeues itself passes through FAILED on its way back to PENDING: a
                # failed state counts once it has held for a while.
                r.final_seen = r.final_seen or time.monotonic()
                if time.monotonic() - r.final_seen < FINAL_STATE_HOLD_S:
                    return None
                return 0 if state == "COMPLETED" else 1

    def stop(self, r: Running) -> None:
        match self.launcher.kind:
            case LauncherKind.local:
                os.killpg(r.handle.pid, signal.SIGTERM)
                r.handle.wait()
            case LauncherKind.slurm:
                subprocess.run(["scancel", str(r.handle)], capture_output=True)

    # -- bookkeeping ------------------------------------------------------------------------------
    def record(self, number: int, params: dict, value: float | None, state: str, run_dir: Path) -> None:
        row = {"number": number, "params": params, "value": value, "state": state, "run_dir": str(run_dir),
               "metric": self.spec.metric, "direction": self.spec.direction}
        with open(self.dir / "trials.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def metric_rows(self, run_dir: Path) -> list[dict]:
        path = run_dir / "metrics.jsonl"
        return [r for r in read_metrics(path) if self.spec.metric in r] if path.is_file() else []

    def poll(self) -> None:
        import optuna

        for r in list(self.running):
            trial = optuna.trial.Trial(self.study, r.trial_id)
            params = r.params
            for row in self.metric_rows(r.run_dir):
                if row["step"] > r.reported:
                    trial.report(row[self.spec.metric], row["step"])
                    r.reported = row["step"]
            code = self.finished_code(r)
            if code is None and r.reported >= 0 and trial.should_prune():
                self.stop(r)
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                self.record(r.number, params, None, "PRUNED", r.run_dir)
                print(f"trial {r.number}: pruned at step {r.reported}", flush=True)
                self.running.remove(r)
            elif code is not None:
                rows = self.metric_rows(r.run_dir)
                if code == 0 and rows:
                    value = rows[-1][self.spec.metric]
                    self.study.tell(trial, value)
                    self.record(r.number, params, value, "COMPLETE", r.run_dir)
                    print(f"trial {r.number}: {self.spec.metric} = {value:.5f}", flush=True)
                else:
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    self.record(r.number, params, None, "FAIL", r.run_dir)
                    print(f"trial {r.number}: failed (exit {code}); see {r.run_dir.parent}/trial-{r.number}.log", flush=True)
                self.running.remove(r)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        import optuna

        lock = self.dir / "driver.pid"
        if lock.exists() and pid_alive(int(lock.read_text() or 0)):
            raise ValueError(f"another `lmtrain sweep` (pid {lock.read_text()}) is driving {self.dir}; stop it first")
        lock.write_text(str(os.getpid()))
        try:
            # Trials left running by a driver that died: relaunch under the same run name (they resume).
            # FrozenTrial has no public id; Optuna's own code reads _trial_id the same way.
            pending = [(t._trial_id, t.number, t.params) for t in self.study.get_trials(deepcopy=False)
                       if t.state == optuna.trial.TrialState.RUNNING]
            while True:
                while pending and len(self.running) < self.launcher.parallel:
                    self.launch(*pending.pop(0))
                done = len([t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()])
                budget = self.spec.n_trials - done - len(self.running) - len(pending)
                if budget > 0 and len(self.running) < self.launcher.parallel:
                    trial = self.study.ask(self.distributions)
                    self.launch(trial._trial_id, trial.number, trial.params)
                    continue
                if not self.running and not pending:
                    break
                time.sleep(self.launcher.poll_s)
                self.poll()
        finally:
            lock.unlink(missing_ok=True)
        self.summarize()

    def summarize(self) -> None:
        complete = [t for t in self.study.get_trials(deepcopy=False) if t.value is not None]
        print(f"\nsweep {self.spec.name}: {len(complete)} complete of {len(self.study.trials)} trials; study {self.dir / 'study.db'}")
        if complete:
            best = self.study.best_trial
            print(f"best: trial {best.number} {self.spec.metric}={best.value:.5f} {best.params} "
                  f"(run dir {self.dir / 'runs' / f'trial-{best.number}'})", flush=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def run(cfg: SweepConfig) -> None:
    Sweep(cfg).run()
