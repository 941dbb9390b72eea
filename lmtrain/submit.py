"""`lmtrain submit`: render the sbatch script for a training run, check it, submit it.

Everything site-specific comes from `conf/cluster/<site>.yaml`; the script is slurm/train.sbatch
with the site and run filled in, written into the run dir (so a requeue and a person both find
it) and handed to sbatch. Every setting is checked when the config is built (`__post_init__`), so
`--dry-run` refuses what sbatch or the job would refuse later.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from lmtrain.checkpoint.owner import check_run_dir_free
from lmtrain.config import TrainConfig, TrainerConfig
from lmtrain.data.prepare import check_prepared, prepared_dir

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch"
SIGNALS = ("USR1", "USR2", "TERM", "INT")
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 24:00:00 or 2-00:00:00)"
# Options render() writes from checked values: sbatch lets the last of a repeated option win, so the
# same option in extra_sbatch would silently replace what the checks saw.
OWN_OPTIONS = ("-J", "--job-name", "-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node", "-c", "--cpus-per-task",
               "-t", "--time", "--signal", "--requeue", "--no-requeue", "--open-mode", "-o", "--output", "-G", "--gpus",
               "--gpus-per-node", "-p", "--partition", "-A", "--account", "-q", "--qos", "--mem", "--mem-per-cpu",
               "--mem-per-gpu")


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
    """Memory per task (per GPU) with a unit, e.g. 64G; None = the partition's default."""
    max_nodes: int = 128
    """The most nodes one job may ask for: the site's node count or your share of it. A larger request
    is refused before sbatch; a site with more nodes raises it in its conf/cluster/<site>.yaml."""
    max_tasks_per_node: int = 128
    """The most tasks (processes) one node may run; GPU nodes are bounded by gpus_per_node as well."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before srun: module loads, activating the environment."""
    command: str = "lmtrain"
    """How the nodes start lmtrain: `lmtrain`, or `python -m lmtrain` from a checkout."""
    runs_dir: Optional[str] = None
    """Run dirs on a filesystem every node sees; None = the config's runs_dir."""
    signal: str = "USR1"
    """Sent --grace_s before the time limit (and by a preempting scheduler): save, requeue, exit."""
    grace_s: int = 120
    """Seconds between the signal and the time limit: enough to finish a step and save a checkpoint."""
    max_requeues: int = 50
    """Requeues after which the job saves and exits instead (0 = never requeue)."""
    extra_sbatch: List[str] = field(default_factory=list)
    """More #SBATCH options, e.g. ['--constraint=h100', '--exclusive']."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("cluster.name='' is empty; name the site (its conf/cluster/<site>.yaml file name)")
        for key in ("partition", "account", "qos"):
            value = getattr(self, key)
            if value is not None and not re.fullmatch(r"[^\s'\"]+", value):
                raise ValueError(f"cluster.{key}={value!r} is not a SLURM {key} name (empty, a space or a quote); "
                                 f"give the name `sinfo`/`sacctmgr` shows, or null to leave it out")
        for key, low in (("gpus_per_node", 0), ("cpus_per_task", 1), ("max_nodes", 1), ("max_tasks_per_node", 1),
                         ("max_requeues", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"cluster.{key}={getattr(self, key)} must be >= {low}")
        if self.gpus_per_node > self.max_tasks_per_node:
            raise ValueError(f"cluster.gpus_per_node={self.gpus_per_node} is more than cluster.max_tasks_per_node="
                             f"{self.max_tasks_per_node}; check the GPUs per node of cluster {self.name}, or raise "
                             "max_tasks_per_node if its nodes really have that many")
        if self.mem_per_task is not None:
            memory_amount(self.mem_per_task, key="cluster.mem_per_task")
        if not self.command.strip():
            raise ValueError("cluster.command='' is empty; use `lmtrain`, or `python -m lmtrain` from a checkout")
        if self.runs_dir is not None and not self.runs_dir.strip():
            raise ValueError("cluster.runs_dir='' is empty; give a directory every node sees, or null for runs_dir")
        if self.signal not in SIGNALS:
            raise ValueError(f"cluster.signal={self.signal!r} is not one of {', '.join(SIGNALS)}")
        if self.grace_s < 30:
            raise ValueError(f"cluster.grace_s={self.grace_s} leaves too little time to save a checkpoint; use >= 30")
        for option in self.extra_sbatch:
            check_extra_option(option)


@dataclass
class SlurmConfig:
    nodes: Optional[int] = None
    """None = trainer.num_nodes."""
    gpus_per_node: Optional[int] = None
    """Tasks (GPUs) per node; None = trainer.devices, or cluster.gpus_per_node when that is left at 1."""
    time: str = "24:00:00"
    """The job's time limit in a SLURM format; quote it in YAML ('24:00:00'), which reads 24:00:00 as 86400."""
    job_name: Optional[str] = None
    """None = the run name."""

    def __post_init__(self) -> None:
        if self.nodes is not None and self.nodes < 1:
            raise ValueError(f"slurm.nodes={self.nodes} must be >= 1; give the number of nodes to run on "
                             "(or leave it unset to use trainer.num_nodes)")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ValueError(f"slurm.gpus_per_node={self.gpus_per_node} must be >= 1; give the tasks (GPUs) per node "
                             "(or leave it unset to use trainer.devices)")
        time_limit_s(self.time)
        if self.job_name is not None and not re.fullmatch(r"[^\s'\"]+", self.job_name):
            raise ValueError(f"slurm.job_name={self.job_name!r} must be a non-empty word without spaces or quotes "
                             "(or null for the run name)")


@dataclass
class SubmitConfig(TrainConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    dry_run: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        compute_layout(self.trainer, self.slurm, self.cluster)  # a job the site or the trainer cannot run
        limit_s = time_limit_s(self.slurm.time)
        if self.cluster.grace_s >= limit_s:
            raise ValueError(f"cluster.grace_s={self.cluster.grace_s} is not shorter than slurm.time={self.slurm.time} "
                             f"({limit_s} s): the requeue signal would come before any training; give a longer "
                             "slurm.time or a smaller cluster.grace_s")


def time_limit_s(spec: str, key: str = "slurm.time") -> int:
    """Seconds in a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", spec)
    if not m:
        raise ValueError(f"{key}={spec!r} is not a SLURM time limit; write it as {TIME_FORMATS}")
    days, a, b, c = m.groups()
    if days is not None:
        parts = [(days, "days", 86400, None), (a, "hours", 3600, 24), (b, "minutes", 60, 60), (c, "seconds", 1, 60)]
    elif c is not None:
        parts = [(a, "hours", 3600, None), (b, "minutes", 60, 60), (c, "seconds", 1, 60)]
    else:
        parts = [(a, "minutes", 60, None), (b, "seconds", 1, 60)]
    total_s = 0
    for text, unit, unit_s, bound in parts:
        if text is None:
            continue
        if bound is not None and int(text) >= bound:
            raise ValueError(f"{key}={spec!r} has {int(text)} {unit}, which must be < {bound} there; "
                             f"write it as {TIME_FORMATS}")
        total_s += int(text) * unit_s
    if total_s == 0:
        raise ValueError(f"{key}={spec!r} is no time limit, but the requeue signal is timed from one; "
                         "give a limit such as 24:00:00")
    if days is None and b is None and total_s > 86400:
        # An unquoted 24:00:00 in a YAML file arrives here as the number 86400 (YAML 1.1 base-60 numbers).
        raise ValueError(f"{key}={spec!r} is {int(a)} minutes ({total_s / 86400:.1f} days); write a limit over a day "
                         f"as D-HH:MM:SS, and quote times in YAML files ('24:00:00'): unquoted, YAML reads "
                         "24:00:00 as the number 86400")
    return total_s


def memory_amount(spec: str, key: str) -> tuple[int, str]:
    """A SLURM memory size with its unit: '64G' -> (64, 'G')."""
    m = re.fullmatch(r"(\d+)([KMGTkmgt])", spec)
    if not m:
        hint = f"; did you mean {spec}G?" if spec.isdigit() else ""
        raise ValueError(f"{key}={spec!r} is not a memory size with a unit (K, M, G or T, e.g. 64G){hint}")
    if int(m.group(1)) == 0:
        raise ValueError(f"{key}={spec!r} must be > 0 (null = the partition's default)")
    return int(m.group(1)), m.group(2).upper()


def check_extra_option(option: str) -> None:
    """One cluster.extra_sbatch entry: an sbatch option that does not replace one lmtrain writes."""
    if not option.startswith("-") or "\n" in option:
        raise ValueError(f"cluster.extra_sbatch entry {option!r} is not an sbatch option (e.g. --exclusive or "
                         "--constraint=h100); put shell commands in cluster.setup")
    name = option.split("=", 1)[0].split()[0]
    name = name if name.startswith("--") else name[:2]
    if name in OWN_OPTIONS:
        raise ValueError(f"cluster.extra_sbatch entry {option!r} sets {name}, which lmtrain writes itself from the "
                         "checked config; set it through slurm.* or cluster.* instead")


def compute_layout(trainer: TrainerConfig, slurm: SlurmConfig, cluster: ClusterConfig) -> tuple[int, int]:
    """(nodes, tasks per node) of the job; refuses a layout the trainer or the site cannot run."""
    nodes = slurm.nodes or trainer.num_nodes
    # Tasks per node: slurm.gpus_per_node, else trainer.devices, else every GPU of the site's nodes.
    per_node = slurm.gpus_per_node or (trainer.devices if trainer.devices != 1 else cluster.gpus_per_node or 1)
    if trainer.devices not in (1, per_node):
        raise ValueError(
            f"slurm.gpus_per_node={per_node} tasks per node but trainer.devices={trainer.devices}: lmtrain runs one task "
            "per device; set them equal (or leave trainer.devices unset)"
        )
    if trainer.num_nodes not in (1, nodes):
        raise ValueError(f"slurm.nodes={nodes} but trainer.num_nodes={trainer.num_nodes}: set them equal (or leave one unset)")
    nodes_key = "slurm.nodes" if slurm.nodes else "trainer.num_nodes"
    if nodes > cluster.max_nodes:
        raise ValueError(f"{nodes_key}={nodes} is more than cluster.max_nodes={cluster.max_nodes} of cluster "
                         f"{cluster.name}; ask for fewer nodes, or if the site has that many, raise max_nodes in "
                         f"conf/cluster/{cluster.name}.yaml (or pass cluster.max_nodes={nodes})")
    per_node_key = ("slurm.gpus_per_node" if slurm.gpus_per_node else
                    "trainer.devices" if trainer.devices != 1 else "cluster.gpus_per_node")
    if cluster.gpus_per_node and per_node > cluster.gpus_per_node:
        raise ValueError(f"{per_node_key}={per_node} tasks per node, but cluster {cluster.name} nodes have "
                         f"{cluster.gpus_per_node} GPUs (cluster.gpus_per_node); use at most {cluster.gpus_per_node} "
                         "per node and more nodes")
    if per_node > cluster.max_tasks_per_node:
        raise ValueError(f"{per_node_key}={per_node} tasks per node is more than cluster.max_tasks_per_node="
                         f"{cluster.max_tasks_per_node} of cluster {cluster.name}; use fewer per node and more nodes, "
                         f"or raise max_tasks_per_node in conf/cluster/{cluster.name}.yaml")
    # The global batch must divide over the job's world size (both >= 1 here, so it is positive).
    dataclasses.replace(trainer, devices=per_node, num_nodes=nodes).accumulation()
    return nodes, per_node


def resolve_layout(cfg: SubmitConfig) -> tuple[int, int]:
    """Sets trainer.devices and trainer.num_nodes to the job's layout; returns (nodes, tasks per node)."""
    nodes, per_node = compute_layout(cfg.trainer, cfg.slurm, cfg.cluster)
    cfg.trainer.devices, cfg.trainer.num_nodes = per_node, nodes
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
        from lmtrain.hf.backbone import hf_spec

        if cfg.init_from and not hf_spec(cfg.init_from) and not Path(cfg.init_from).exists():  # a hub id is fetched by the job
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
    if c.mem_per_task:  # per task; --mem is per node (--mem-per-cpu would multiply it by cpus_per_task)
        amount, unit = memory_amount(c.mem_per_task, key="cluster.mem_per_task")
        options.append(f"--mem={amount * per_node}{unit}")
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
    check_run_dir_free(run_dir)  # before anything is written into a live run's directory
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
