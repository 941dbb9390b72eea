"""Typed configs: the root schemas of each subcommand, registered in Hydra's ConfigStore.

Each group (model, data, optim, ...) is owned by its package; this module only composes them.
A typed root makes Hydra reject an unknown key or a wrong type at compose time, and
OmegaConf.to_object() runs every dataclass's __post_init__ checks before any work is done.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lmtrain.data.config import DataConfig, PrepareExecutionConfig, TokenizerConfig
from lmtrain.distributed.config import StrategyConfig
from lmtrain.loggers import LoggerConfig
from lmtrain.model.config import ModelConfig
from lmtrain.optim import OptimConfig, ScheduleConfig
from lmtrain.tasks.config import TaskConfig, TaskKind

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    """Optimizer steps to train for."""
    seq_len: int = 256
    """Tokens per training sequence (<= model.max_seq_len)."""
    micro_batch_size: int = 16
    """Sequences per rank per forward pass."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks; None = micro_batch_size x world size. Gradient
    accumulation is derived from it, so changing the number of GPUs keeps the optimization the same."""
    global_batch_tokens: Optional[int] = None
    """The global batch in tokens instead (e.g. 524288 = 2**19, GPT-3/Llama style): global_batch_size is
    derived as global_batch_tokens / seq_len, which must divide it. Set one of the two, not both."""
    accelerator: str = "auto"
    """auto (a GPU when there is one), cpu or gpu."""
    devices: int = 1
    """Processes (GPUs) per node."""
    num_nodes: int = 1
    precision: str = "auto"
    """auto = bf16-mixed on a GPU that has bf16, 32-true elsewhere; or any Lightning precision string."""
    val_every_steps: int = 200
    val_batches: int = 8
    """The fixed validation subset: the first val_batches x global batch size windows of the val split
    (of each source, for a mixture), the same on any number of ranks and any micro batch size."""
    ckpt_every_steps: int = 500
    keep_last_checkpoints: int = 3
    checkpoint: bool = True
    """false: write no checkpoints at all (benchmarks, smoke runs)."""
    log_every_steps: int = 10
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    compile: bool = False
    """torch.compile each Transformer block."""
    loss_chunk_tokens: int = 0
    """Causal LM training: compute the loss this many tokens at a time (each chunk's logits recomputed in
    backward), so the fp32 (batch x seq_len x vocab) logits are never whole in memory; 0 = one piece.
    Losses equal the plain path's up to fp32 summation order; costs one more lm-head matmul per chunk."""
    activation_checkpointing: bool = False
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    peak_flops_per_device: Optional[float] = None
    """Peak FLOP/s for MFU; None = known GPUs (H100/H200 989e12 dense bf16, A100 312e12) or no MFU."""
    sample_prompt: str = ""
    """Printed sample at the end starts from this text ('' = from a document boundary)."""
    sample_tokens: int = 200
    progress_bar: Optional[bool] = None
    """None = a progress bar on a terminal, plain lines otherwise."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "seq_len", "micro_batch_size", "devices", "num_nodes", "val_every_steps",
                     "val_batches", "ckpt_every_steps", "keep_last_checkpoints", "log_every_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be > 0")
        for name in ("num_workers", "sample_tokens", "loss_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= 0")
        if self.peak_flops_per_device is not None and self.peak_flops_per_device <= 0:
            raise ValueError(f"trainer.peak_flops_per_device={self.peak_flops_per_device} must be > 0 (or null)")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise ValueError(f"trainer.global_batch_size={self.global_batch_size} must be > 0 (or null)")
        if self.global_batch_tokens is not None:
            if self.global_batch_size is not None:
                raise ValueError(
                    f"trainer.global_batch_tokens={self.global_batch_tokens} and trainer.global_batch_size="
                    f"{self.global_batch_size} are both set; set one (the other is derived), e.g. "
                    "trainer.global_batch_size=null")
            if self.global_batch_tokens <= 0 or self.global_batch_tokens % self.seq_len:
                lower = max(1, self.global_batch_tokens // self.seq_len) * self.seq_len
                raise ValueError(
                    f"trainer.global_batch_tokens={self.global_batch_tokens} is not a positive multiple of "
                    f"trainer.seq_len={self.seq_len}: a step reads whole sequences. Use {lower} or "
                    f"{lower + self.seq_len} (= {lower // self.seq_len} or {lower // self.seq_len + 1} sequences)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.accelerator not in ("auto", "cpu", "gpu", "cuda"):
            raise ValueError(f"trainer.accelerator={self.accelerator!r} is not one of auto, cpu, gpu")
        if self.grad_clip < 0:
            raise ValueError(f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    def resolved_global_batch_size(self) -> int:
        if self.global_batch_tokens is not None:
            return self.global_batch_tokens // self.seq_len
        return self.global_batch_size or self.micro_batch_size * self.world_size

    def _batch_origin(self) -> str:
        if self.global_batch_tokens is None:
            return ""
        return f" (trainer.global_batch_tokens={self.global_batch_tokens} / seq_len {self.seq_len})"

    def accumulation(self) -> int:
        per_pass = self.micro_batch_size * self.world_size
        g = self.resolved_global_batch_size()
        if g % per_pass:
            raise ValueError(
                f"trainer.global_batch_size={g}{self._batch_origin()} is not a multiple of trainer.micro_batch_size={self.micro_batch_size} "
                f"x world size {self.world_size} (devices={self.devices} x num_nodes={self.num_nodes}) = {per_pass}; "
                f"choose a global batch of k x {per_pass}"
            )
        return g // per_pass


@dataclass
class HarnessTasks:
    """Which lm-evaluation-harness tasks to score and how (shared by `lmtrain harness` and harness.*)."""

    tasks: List[str] = field(default_factory=list)
    """lm-eval task names, e.g. [arc_easy,hellaswag] (fetched from the hub when online), or tasks of include_path."""
    include_path: Optional[str] = None
    """A directory of lm-eval task YAMLs (local tasks, local data)."""
    limit: Optional[float] = None
    """At most this many examples per task (a fraction below 1); None = all."""
    num_fewshot: Optional[int] = None
    batch_size: int = 16
    max_gen_toks: int = 256
    """generate_until tasks: new tokens at most (also bounded by the model's context)."""

    def check(self, prefix: str = "") -> None:
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"{prefix}limit={self.limit} must be positive (a count, or a fraction below 1), or null for all")
        if self.batch_size < 1:
            raise ValueError(f"{prefix}batch_size={self.batch_size} must be >= 1")


@dataclass
class HarnessTrainConfig(HarnessTasks):
    """lm-eval tasks scored during training (causal LMs): logged as harness/<task>/<metric>."""

    every_steps: int = 0
    """Score every N optimizer steps; 0 = never."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"harness.every_steps={self.every_steps} must be >= 0 (0 = never)")
        if self.every_steps > 0 and not self.tasks:
            raise ValueError(f"harness.every_steps={self.every_steps} but harness.tasks is empty; name lm-eval tasks, "
                             "e.g. harness.tasks=[arc_easy]")
        self.check("harness.")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    harness: HarnessTrainConfig = field(default_factory=HarnessTrainConfig)
    run_name: Optional[str] = None
    """The run directory's name under runs_dir; None = the SLURM job id, else a timestamp. Reusing a
    name continues that run (resume=auto)."""
    runs_dir: str = "runs"
    seed: int = 1337
    resume: str = "auto"
    """auto: continue from the newest valid checkpoint of this run, if any; never; or a checkpoint path."""
    init_from: Optional[str] = None
    """Start from these weights (any strategy's checkpoint) with a fresh optimizer at step 0; ignored
    when the run resumes from its own checkpoint."""

    def __post_init__(self) -> None:
        if self.run_name is not None:
            check_run_name(self.run_name)
        if self.resume not in ("auto", "never") and not Path(self.resume).suffix and "/" not in self.resume:
            raise ValueError(f"resume={self.resume!r} is not auto, never or a checkpoint path")
        if self.trainer.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"trainer.seq_len={self.trainer.seq_len} exceeds model.max_seq_len={self.model.max_seq_len} "
                f"of model={self.model.name}; lower trainer.seq_len or raise model.max_seq_len"
            )
        if self.harness.every_steps and self.task.kind is not TaskKind.causal_lm:
            raise ValueError(f"harness.every_steps={self.harness.every_steps} but task={self.task.kind.value}: lm-eval "
                             "scores causal language models; set harness.every_steps=0")
        self.trainer.accumulation()  # a global batch that does not divide fails here, before any work


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    force: bool = False
    """Rebuild even when a complete prepared copy exists."""
    prepare: PrepareExecutionConfig = field(default_factory=PrepareExecutionConfig)
    """Where the work runs: prepare.executor=single (one process) or local / slurm (datatrove tasks)."""


@dataclass
class GenerateConfig:
    ckpt: str = "???"
    """A checkpoint file (runs/<run>/checkpoints/last.ckpt)."""
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.8
    """0 = greedy."""
    top_k: Optional[int] = 50
    top_p: Optional[float] = None
    num_samples: int = 1
    seed: int = 0
    device: str = "auto"
    beam_size: Optional[int] = None
    """A task=translate checkpoint: the prompt is a source sentence, decoded with this beam width
    (None = the run's task.beam_size); sampling options do not apply."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1 (the number of samples to print)")


@dataclass
class EvalConfig:
    ckpt: str = "???"
    val_batches: Optional[int] = None
    """Micro batches of the val split to evaluate; None = all of it."""
    micro_batch_size: Optional[int] = None
    """None = the run's own."""
    device: str = "auto"
    val_paths: List[str] = field(default_factory=list)
    """Fine-tuned tasks: evaluate on these local files (same columns as training) instead of the run's val split."""
    beam_size: Optional[int] = None
    """translate: beam width for BLEU; None = the run's task.beam_size."""


@dataclass
class PredictConfig:
    ckpt: str = "???"
    """A fine-tuned checkpoint: task=classify, qa or translate."""
    text: Optional[str] = None
    """classify: the text to label; translate: the source sentence."""
    text_pair: Optional[str] = None
    """classify: the second text of a sentence-pair task."""
    question: Optional[str] = None
    """qa: the question..."""
    context: Optional[str] = None
    """qa: ...and the passage that answers it."""
    beam_size: Optional[int] = None
    """translate: beam width; None = the run's task.beam_size."""
    device: str = "auto"


@dataclass
class InspectConfig:
    ckpt: str = "???"
    """Any checkpoint (causal_lm, masked_lm, classify, qa, translate; a file or a ZeRO / FSDP directory)."""
    text: str = "???"
    """The text to look at."""
    out: Optional[str] = None
    """Directory for the PNGs and inspect.json; default runs/<run>/inspect/<checkpoint name>."""
    ig_steps: int = 32
    """classify: integration points of integrated gradients (more = a smaller convergence delta)."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.ig_steps < 1:
            raise ValueError(f"ig_steps={self.ig_steps} must be >= 1 (integration points of integrated gradients, e.g. 32)")


@dataclass
class HarnessConfig(HarnessTasks):
    ckpt: str = "???"
    """Any causal-LM checkpoint: a file (single/DDP) or a ZeRO / FSDP directory."""
    seed: int = 1234
    out: Optional[str] = None
    """Results JSON; default runs/<run>/harness/<checkpoint name>.json."""
    wandb: bool = False
    """Also log harness/<task>/<metric> to the run's W&B run (the id the run recorded), at the checkpoint's step."""
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks is empty; name the lm-eval tasks to run, e.g. tasks=[arc_easy,hellaswag] "
                             "(or tasks of include_path=DIR)")
        self.check()


class ExportFormat(Enum):
    torch = "torch"
    safetensors = "safetensors"
    hf = "hf"


@dataclass
class ExportConfig:
    ckpt: str = "???"
    """Any strategy's checkpoint: a file (single/DDP) or a directory (DeepSpeed ZeRO, FSDP)."""
    format: ExportFormat = ExportFormat.torch
    """torch or safetensors: lmtrain's own state dict in one file; hf: a Hugging Face model directory
    (GPT-2- and Llama-shaped causal LMs, BERT-shaped masked LMs) that transformers loads."""
    dtype: str = "fp32"
    """fp32 or bf16."""
    out: Optional[str] = None
    """Output file (format=hf: a directory); default runs/<run>/export-<checkpoint>-<dtype>.pt|.safetensors|-hf."""
    overwrite: bool = False
    """Replace an existing file at `out` (never a checkpoint of a run; format=hf: only an earlier HF export)."""
    check: bool = True
    """format=hf: load the export with transformers and compare its fp32 logits with lmtrain's on a fixed input."""
    check_atol: float = 1e-4
    """format=hf: the largest max-abs logit difference the check accepts."""
    max_shard_size: str = "5GB"
    """format=hf: weights above this size are split into model-0000i-of-0000n.safetensors + an index."""

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} is not one of fp32, bf16")
        if not self.check_atol > 0:
            raise ValueError(f"check_atol={self.check_atol} must be positive (e.g. 1e-4); use check=false to skip the check")


def check_run_name(name: str) -> str:
    """A run name is one path component under runs_dir: `..`, `a/b` or `.` would write elsewhere."""
    if name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name or name.startswith("-"):
        raise ValueError(f"run_name={name!r} is not a plain directory name (one path component, no '/', not '.' "
                         "or '..', not starting with '-'); choose e.g. run_name=gpt2-a, or set runs_dir= for another place")
    return name


def default_run_name(explicit: Optional[str]) -> str:
    """Stable across SLURM requeues (the job id) and for Lightning's child processes (they get the
    parent's run dir); a timestamp otherwise."""
    if explicit is not None:
        return check_run_name(str(explicit))
    if job := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"job{job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if job := os.environ.get("SLURM_JOB_ID"):
        return f"job{job}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        # torchrun and similar: every process composes its own config, so a timestamp would differ.
        raise ValueError("several processes were launched without a run name; set run_name=NAME (the same on every process)")
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)  # two runs started in one second stay apart


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (srun, torchrun); 0 when none did."""
    for var in ("SLURM_PROCID", "RANK"):
        if var in os.environ and ("SLURM_STEP_ID" in os.environ or var == "RANK"):
            return int(os.environ[var])
    return 0


def conf_dir() -> Path:
    """conf/ inside an installed wheel, or at the top of a checkout."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "conf"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="inspect_schema", node=InspectConfig)
    cs.store(name="harness_schema", node=HarnessConfig)
    from lmtrain.distributed.plan import PlanConfig  # here: plan.py imports TrainerConfig from this module

    cs.store(name="plan_schema", node=PlanConfig)
    from lmtrain.submit import SubmitConfig  # here too: submit.py extends TrainConfig

    cs.store(name="submit_schema", node=SubmitConfig)
    from lmtrain.sweep import SweepConfig

    cs.store(name="sweep_schema", node=SweepConfig)
    from lmtrain.reports import PlotConfig, SweepReportConfig  # matplotlib itself is imported only to draw

    cs.store(name="plot_schema", node=PlotConfig)
    cs.store(name="sweep_report_schema", node=SweepReportConfig)
    if not OmegaConf.has_resolver("lmtrain_run_name"):
        OmegaConf.register_new_resolver("lmtrain_run_name", default_run_name, use_cache=True)


def to_typed(cfg: DictConfig) -> Any:
    """DictConfig -> the schema's dataclasses, running every __post_init__ check. A key the schema
    does not have (added with `+key=value`) is refused, not ignored."""
    from lmtrain.config_errors import check_known_keys

    check_known_keys(cfg)
    return OmegaConf.to_object(cfg)


def to_record(cfg: DictConfig) -> dict:
    """The resolved config as plain containers: saved in the run dir and in every checkpoint."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

