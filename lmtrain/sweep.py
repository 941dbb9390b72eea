"""`lmtrain sweep`: a Bayesian hyperparameter search whose study outlives any one process.

An Optuna study (TPE sampler, median pruner) lives in `<sweeps_dir>/<name>/study.db` (SQLite). Each
trial is an ordinary `lmtrain train` run, `runs/trial-<n>` under the sweep dir, started locally
(sequentially or N at a time) or as a SLURM job through `lmtrain submit` (multi-GPU, requeueable,
auto-resumed like any other run). The driver only launches, watches the run's metrics.jsonl for
intermediate values (pruning), and records results, with the reason of a trial that failed.
Before the first trial it composes the trials' `lmtrain train` config and checks the parameter
keys, their values and that such a run logs the metric. Killed and rerun, it continues: finished
trials are kept, trials that were running are relaunched under the same run name, so they resume
from their own checkpoints, and new trials fill the budget.

Why not Hydra's Optuna sweeper: it pins optuna 2.10 and SQLAlchemy 1.4 and runs trials inside the
sweeping process, so a trial cannot be a multi-GPU job and an interrupted sweep loses its running
trials. Here trials are processes or cluster jobs, and current Optuna's storage holds the study.
"""

from __future__ import annotations

import difflib
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
from lmtrain.tasks.config import TaskKind


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
    """'key: loguniform(lo, hi)' | 'key: uniform(lo, hi)' | 'key: int(lo, hi)' | 'key: choice(a, b, ...)'.
    Every key must be one of the `lmtrain train` config (or a group: 'model: choice(tiny, llama_160m)')."""
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

PARAM = re.compile(r"^\s*(\+{0,2}[\w.]+)\s*:\s*(loguniform|uniform|int|choice)\((.*)\)\s*$")


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


# -- before the first trial: can the trials be scored? --------------------------------------------
_ABSENT = object()
TRAIN_METRICS = ("train/loss", "opt/lr", "opt/grad_norm", "perf/step_s", "perf/tokens_per_s", "perf/peak_mem_gib",
                 "perf/mfu")
"""StepMetrics' training rows (perf/peak_mem_gib on a GPU only, perf/mfu where peak FLOP/s are known)."""


def loggable_metrics(kind: TaskKind) -> tuple[str, ...]:
    """Every metric a `lmtrain train` run of this task can write to metrics.jsonl: the task's
    validation row (its `last_val`, and val/bpb from StepMetrics for a causal LM) and the training
    rows. tests/integration/test_sweep.py checks this against a real run of every task."""
    match kind:
        case TaskKind.causal_lm:
            val = ("val/loss", "val/ppl", "val/bpb")
        case TaskKind.masked_lm:
            val = ("val/loss", "val/ppl", "val/masked_acc")
        case TaskKind.classify:
            val = ("val/loss", "val/accuracy", "val/macro_f1")
        case TaskKind.qa:
            val = ("val/loss", "val/exact_match", "val/f1")
        case TaskKind.translate:
            val = ("val/loss", "val/ppl", "val/bleu")
        case _:
            raise ValueError(f"task.kind={kind} has no list of the metrics it logs in lmtrain/sweep.py")
    return (*val, *TRAIN_METRICS, "data/tokens_seen" if kind.pretraining else "data/samples_seen")


def check_trials_scorable(spec: SweepSpec, distributions: dict) -> None:
    """Compose the `lmtrain train` config of the trials from the real conf/ (the shared overrides,
    every parameter at both ends of its range and at each of its choices) and check that its
    typed config is valid and that such a run logs spec.metric. Raises ValueError in one line."""
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from lmtrain.config import to_typed

    default = _compose_train([], hydra_node=True)
    groups = set(default.hydra.runtime.choices)
    with open_dict(default):
        del default["hydra"]
    check_keys(spec, distributions, default, groups)
    for values in compute_probes(distributions):
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        try:
            typed = to_typed(_compose_train([*spec.overrides, *(f"{k}={v}" for k, v in values.items())]))
        except (ValueError, HydraException, OmegaConfBaseException) as e:
            raise ValueError(f"a trial with {shown} would fail before training: {one_line(e)}; fix sweep.params "
                             "or sweep.overrides") from e
        check_metric(spec.metric, typed, shown)


def check_keys(spec: SweepSpec, distributions: dict, default, groups: set[str]) -> None:
    """Every parameter and override names a key of the train config or a config group (a '+' in
    front makes Hydra add an unknown key, which training then ignores: refused as well)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

    try:
        overrides = [(o.key_or_group, f"sweep.overrides entry {o.input_line!r}")
                     for o in OverridesParser.create().parse_overrides(list(spec.overrides))]
    except HydraException as e:
        raise ValueError(f"sweep.overrides={list(spec.overrides)} do not parse: {one_line(e)}") from e
    keys = [*((k, f"sweep.params key {k!r}") for k in distributions), *overrides]
    for key, where in keys:
        bare = key.lstrip("+")
        if bare in groups or bare.split(".")[0] == "hydra" or OmegaConf.select(default, bare, default=_ABSENT) is not _ABSENT:
            continue
        parent, _, leaf = bare.rpartition(".")
        node = OmegaConf.select(default, parent, default=None) if parent else default
        siblings = [str(k) for k in node] if isinstance(node, DictConfig) else sorted({*map(str, default), *groups})
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f"did you mean {'.'.join(filter(None, (parent, close[0])))!r}? " if close else ""
        raise ValueError(f"{where}: {bare!r} is not a key of the `lmtrain train` config; {hint}"
                         f"{parent or 'the top level'} has: {', '.join(siblings)}")


def check_metric(metric: str, typed, shown: str) -> None:
    """typed: a trial's TrainConfig; shown: its parameter values, for the message."""
    if metric.startswith("harness/"):
        check_harness_metric(metric, typed, shown)
        return
    loggable = loggable_metrics(typed.task.kind)
    if metric not in loggable:
        raise ValueError(f"sweep.metric={metric!r} is not logged by a task={typed.task.kind.value} run; choose one "
                         f"of: {', '.join(loggable)}")
    if metric.startswith("val/") and typed.trainer.val_every_steps > typed.trainer.max_steps:
        raise ValueError(f"sweep.metric={metric!r} is logged at validation, every trainer.val_every_steps="
                         f"{typed.trainer.val_every_steps} steps, but a trial with {shown} stops at trainer.max_steps="
                         f"{typed.trainer.max_steps}: no trial would log it; lower trainer.val_every_steps")


def check_harness_metric(metric: str, typed, shown: str) -> None:
    """harness/<task>/<metric>: logged every harness.every_steps steps for each of harness.tasks."""
    task = metric.split("/")[1] if metric.count("/") == 2 else ""
    harness = typed.harness
    if harness.every_steps == 0 or task not in harness.tasks:
        raise ValueError(f"sweep.metric={metric!r} is an lm-eval score, logged only for the tasks of harness.tasks "
                         f"(now {list(harness.tasks)}, every harness.every_steps={harness.every_steps} steps); add "
                         f"harness.tasks=[{task or '<task>'}] harness.every_steps=N to sweep.overrides")
    if harness.every_steps > typed.trainer.max_steps:
        raise ValueError(f"sweep.metric={metric!r} is logged every harness.every_steps={harness.every_steps} steps, but a "
                         f"trial with {shown} stops at trainer.max_steps={typed.trainer.max_steps}: no trial would log "
                         "it; lower harness.every_steps")


def compute_probes(distributions: dict) -> list[dict]:
    """Assignments that together give every parameter both ends of its range and each of its choices."""
    import optuna.distributions as d

    def values(dist) -> list:
        match dist:
            case d.CategoricalDistribution():
                return list(dist.choices)
            case _:
                return [dist.low, dist.high]

    per_param = {k: values(v) for k, v in distributions.items()}
    n = max(len(v) for v in per_param.values())
    return [{k: v[min(i, len(v) - 1)] for k, v in per_param.items()} for i in range(n)]


def _compose_train(overrides: list[str], *, hydra_node: bool = False):
    """The `lmtrain train` config from the real conf/, inside `lmtrain sweep`'s Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmtrain.config import conf_dir, register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():  # the app's search path is conf/ too
        return compose("train", overrides, return_hydra_config=hydra_node)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("train", overrides, return_hydra_config=hydra_node)


def one_line(e: BaseException) -> str:
    """A Hydra or OmegaConf error (several lines, the reason often in its cause) as one line."""
    parts = []
    while e is not None and len(parts) < 3:
        text = ""
        for line in str(e).split("\nConfig search path")[0].splitlines():
            if not line.strip() or line.strip().startswith(("full_key:", "object_type=", "reference_type=")):
                continue
            indented = line[0].isspace() and text and not text.endswith(":")  # an item of a list: 'a, b'
            text += (", " if indented else " " if text else "") + line.strip()
        parts.append(text)
        e = e.__cause__
    return ": ".join(p for p in parts if p)


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
        self.distributions = dict(parse_param(p) for p in self.spec.params)
        check_trials_scorable(self.spec, self.distributions)  # before anything is written
        self.dir = Path(self.spec.sweeps_dir).expanduser().resolve() / self.spec.name
        self.dir.mkdir(parents=True, exist_ok=True)
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
                with open(self.log_path(number, None), "a") as log:
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

    def log_path(self, number: int, handle: object) -> Path:
        """Where the trial's output goes: the sweep's runs/trial-<n>.log, or the SLURM job's file."""
        match self.launcher.kind:
            case LauncherKind.local:
                return self.dir / "runs" / f"trial-{number}.log"
            case LauncherKind.slurm:
                return self.dir / "runs" / f"trial-{number}" / f"slurm-{handle}.out"

    # -- bookkeeping ------------------------------------------------------------------------------
    def record(self, number: int, params: dict, value: float | None, state: str, run_dir: Path,
               reason: str | None = None) -> None:
        row = {"number": number, "params": params, "value": value, "state": state, "run_dir": str(run_dir),
               "metric": self.spec.metric, "direction": self.spec.direction, "reason": reason}
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
                    log = self.log_path(r.number, r.handle)
                    local = self.launcher.kind is LauncherKind.local
                    exit_code = code if local or code == 0 else None  # a failed SLURM job has a state, not a code
                    reason = compute_failure_reason(exit_code, read_tail(log), self.spec.metric)
                    trial.set_user_attr("fail_reason", reason)
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    self.record(r.number, params, None, "FAIL", r.run_dir, reason)
                    print(f"trial {r.number}: failed: {reason} (log {log})", flush=True)
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
        """Print the outcome; raise when every trial failed (the sweep found nothing)."""
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.value is not None]
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        print(f"\nsweep {self.spec.name}: {len(complete)} complete, {len(failed)} failed of {len(trials)} trials; "
              f"study {self.dir / 'study.db'}", flush=True)
        if complete:
            best = self.study.best_trial
            print(f"best: trial {best.number} {self.spec.metric}={best.value:.5f} {best.params} "
                  f"(run dir {self.dir / 'runs' / f'trial-{best.number}'})", flush=True)
        if trials and len(failed) == len(trials):
            first = min(failed, key=lambda t: t.number)
            raise ValueError(
                f"sweep {self.spec.name}: {len(failed)} of {len(trials)} trials failed; the first, trial {first.number}, "
                f"with: {first.user_attrs.get('fail_reason', 'no reason recorded')}. Fix that, then run the sweep "
                f"under a new sweep.name (this study's trial budget is spent); trial logs in {self.dir / 'runs'}")


FAIL_REASON_MAX_CHARS = 500
# The line a failed `lmtrain train` leaves last: lmtrain's own error, else a traceback's exception.
LMTRAIN_ERROR = re.compile(r"^lmtrain: error: .+")
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)(?::.*)?$")


def compute_failure_reason(exit_code: int | None, output: str, metric: str) -> str:
    """Why a trial failed, in one line: its exit (None: unknown, a SLURM job) and the last error
    line of its output, or that it finished without ever logging the metric."""
    if exit_code == 0:
        return f"finished but never logged {metric}"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    line = next((x for x in reversed(lines) if LMTRAIN_ERROR.match(x)), None) \
        or next((x for x in reversed(lines) if EXCEPTION_LINE.match(x)), None) \
        or (lines[-1] if lines else "no output")
    match exit_code:
        case None:
            how = "failed"
        case code if code < 0:
            how = f"killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"killed ({code})"
        case code:
            how = f"exit {code}"
    return f"{how}: {line}"[:FAIL_REASON_MAX_CHARS]


def read_tail(path: Path, max_bytes: int = 65536) -> str:
    """The end of a log file ('' if there is none): where a failed run's last words are."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        return f.read().decode(errors="replace")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def run(cfg: SweepConfig) -> None:
    Sweep(cfg).run()
