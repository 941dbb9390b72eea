"""`lmtrain submit`: render the sbatch script for a training run, check it, submit it.

Everything site-specific comes from `conf/cluster/<site>.yaml`; the script is slurm/train.sbatch
with the site and run filled in, written into the run dir (so a requeue and a person both find
it) and handed to sbatch.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from lmtrain.config import TrainConfig
from lmtrain.data.prepare import check_prepared, prepared_dir

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch"
SIGNALS = ("USR1", "USR2", "TERM", "INT")


@dataclass
class ClusterConfig:
    name: str = "local"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    gpus_per_node: int = 0
    """GPUs per node; 0 = CPU nodes (one task per requested 'device')."""
    cpus_per_task: int = 1
    mem_per_task: Optional[str] = None
    """e.g. 64G; None = the partition's default."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before srun: module loads, activating the environment."""
    command: str = "lmtrain"
    """How the nodes start lmtrain: `lmtrain`, or `python -m lmtrain` from a checkout."""
    runs_dir: Optional[str] = None
    """Run dirs on a filesystem every node sees; None = the config's runs_dir."""
    signal: str = "USR1"
    """Sent --grace_s before the time limit (and by a preempting scheduler): save, requeue, exit."""
    grace_s: int = 120
    max_requeues: int = 50
    extra_sbatch: List[str] = field(default_factory=list)
    """More #SBATCH options, e.g. ['--constraint=h100', '--exclusive']."""

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"cluster.signal={self.signal!r} is not one of {', '.join(SIGNALS)}")
        if self.grace_s < 30:
            raise ValueError(f"cluster.grace_s={self.grace_s} leaves too little time to save a checkpoint; use >= 30")


@dataclass
class SlurmConfig:
    nodes: Optional[int] = None
    """None = trainer.num_nodes."""
    gpus_per_node: Optional[int] = None
    """Tasks (GPUs) per node; None = trainer.devices, or cluster.gpus_per_node when that is left at 1."""
    time: str = "24:00:00"
    job_name: Optional[str] = None


@dataclass
class SubmitConfig(TrainConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    dry_run: bool = False


def time_limit_s(spec: str) -> int:
    """SLURM time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec.strip())
    if not m:
        raise ValueError(f"slurm.time={spec!r} is not a SLURM time (e.g. 24:00:00 or 2-00:00:00)")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)


def resolve_layout(cfg: SubmitConfig) -> tuple[int, int]:
    """(nodes, tasks per node); a mismatch with the trainer is refused before anything is submitted."""
    t = cfg.trainer
    nodes = cfg.slurm.nodes or t.num_nodes
    # Tasks per node: slurm.gpus_per_node, else trainer.devices, else every GPU of the site's nodes.
    per_node = cfg.slurm.gpus_per_node or (t.devices if t.devices != 1 else cfg.cluster.gpus_per_node or 1)
    if t.devices not in (1, per_node):
        raise ValueError(
            f"slurm.gpus_per_node={per_node} tasks per node but trainer.devices={t.devices}: lmtrain runs one task per "
            "device; set them equal (or leave trainer.devices unset)"
        )
    if t.num_nodes not in (1, nodes):
        raise ValueError(f"slurm.nodes={nodes} but trainer.num_nodes={t.num_nodes}: set them equal (or leave one unset)")
    if cfg.cluster.gpus_per_node and per_node > cfg.cluster.gpus_per_node:
        raise ValueError(f"{per_node} tasks per node, but cluster {cfg.cluster.name} nodes have "
                         f"{cfg.cluster.gpus_per_node} GPUs (cluster.gpus_per_node)")
    t.devices, t.num_nodes = per_node, nodes
    t.accumulation()  # the global batch must divide over the job's world size
    return nodes, per_node


def preflight(cfg: SubmitConfig, run_dir: Path) -> list[str]:
    """The checks that would otherwise fail on the cluster after a queue wait; their report lines."""
    nodes, per_node = resolve_layout(cfg)
    report = [f"layout: {nodes} node(s) x {per_node} task(s) = world size {nodes * per_node}, "
              f"global batch {cfg.trainer.resolved_global_batch_size()} (accumulation {cfg.trainer.accumulation()})"]
    if cfg.task.kind.pretraining:
        data_dir = prepared_dir(cfg.data, cfg.tokenizer)
        problem = "it does not exist" if not data_dir.is_dir() else check_prepared(data_dir)
        if problem:
            raise ValueError(f"prepared data {data_dir} cannot be used ({problem}); run `lmtrain prepare` with the same "
                             "data.* and tokenizer.* settings first (on a node that sees the same filesystem)")
        report.append(f"data: {data_dir} is prepared")
    else:  # labelled examples: the files and the backbone must be there
        from lmtrain.data.sources import resolve_local_files

        if cfg.data.source.name != "hub":
            resolve_local_files([*cfg.data.paths, *cfg.data.val_paths])
        if cfg.init_from and not Path(cfg.init_from).exists():
            raise ValueError(f"init_from={cfg.init_from} does not exist; name the backbone checkpoint to fine-tune")
        report.append(f"data: {cfg.task.kind.name} examples from {cfg.data.source.name}"
                      + (f", backbone {cfg.init_from}" if cfg.init_from else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write-test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run dir {run_dir} is not writable: {e}") from e
    report.append(f"run dir: {run_dir} is writable")
    limit = time_limit_s(cfg.slurm.time)
    if cfg.cluster.grace_s >= limit:
        raise ValueError(f"cluster.grace_s={cfg.cluster.grace_s} is not shorter than slurm.time={cfg.slurm.time}")
    report.append(f"requeue: SIG{cfg.cluster.signal} {cfg.cluster.grace_s} s before the {cfg.slurm.time} limit, "
                  f"at most {cfg.cluster.max_requeues} requeues")
    return report


def render(cfg: SubmitConfig, run_dir: Path, train_overrides: list[str]) -> str:
    nodes, per_node = cfg.trainer.num_nodes, cfg.trainer.devices
    c = cfg.cluster
    options = [f"--job-name={cfg.slurm.job_name or run_dir.name}", f"--nodes={nodes}", f"--ntasks-per-node={per_node}",
               f"--cpus-per-task={c.cpus_per_task}", f"--time={cfg.slurm.time}",
               f"--signal={c.signal}@{c.grace_s}", "--requeue", "--open-mode=append",
               f"--output={run_dir}/slurm-%j.out"]
    if c.gpus_per_node:
        options.append(f"--gpus-per-node={per_node}")
    for name in ("partition", "account", "qos"):
        if value := getattr(c, name):
            options.append(f"--{name}={value}")
    if c.mem_per_task:
        options.append(f"--mem-per-cpu={c.mem_per_task}")
    options += c.extra_sbatch
    args = [*train_overrides, f"run_name={run_dir.name}", f"runs_dir={run_dir.parent}",
            f"trainer.devices={per_node}", f"trainer.num_nodes={nodes}"]
    env = [f"export LMTRAIN_COMMAND={shlex.quote(c.command)}", f"export LMTRAIN_REQUEUE_SIGNAL={c.signal}",
           f"export LMTRAIN_MAX_REQUEUES={c.max_requeues}"]
    body = TEMPLATE.read_text()
    body = replace_block(body, "sbatch options", [f"#SBATCH {o}" for o in options])
    body = replace_block(body, "setup", [*c.setup, *env])
    return replace_block(body, "args", [f"    {shlex.quote(a)}" for a in args])


def replace_block(text: str, name: str, lines: list[str]) -> str:
    """Replace the lines between `# >>> name` and `# <<< name` in the template."""
    start, end = f"# >>> {name}\n", f"# <<< {name}\n"
    i, j = text.index(start), text.index(end)
    return text[: i + len(start)] + "".join(line + "\n" for line in lines) + text[j:]


SUBMIT_ONLY = ("cluster", "slurm", "dry_run", "run_name", "runs_dir")


def run(cfg: SubmitConfig, overrides: list[str]) -> str | None:
    """Check, render, and (unless dry_run) submit; returns the job id."""
    train_overrides = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in SUBMIT_ONLY]
    runs_dir = Path(cfg.cluster.runs_dir or cfg.runs_dir).expanduser().resolve()
    name = cfg.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = runs_dir / name
    report = preflight(cfg, run_dir)
    script = render(cfg, run_dir, train_overrides)
    path = run_dir / "submit.sbatch"
    path.write_text(script)
    print("checks passed:\n  " + "\n  ".join(report), flush=True)
    if cfg.dry_run:
        print(f"\n--dry-run: would submit {path}:\n\n{script}", flush=True)
        return None
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(f"sbatch refused {path}: {out.stderr.strip()}")
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}; run dir {run_dir}; log {run_dir}/slurm-{job}.out", flush=True)
    return job
