"""A trained run back from any of its checkpoints: one typed record (`RunRecord`) and one loader
(`load_trained`) that every consumer uses: generate, eval, predict, inspect, harness, export (torch,
safetensors, hf), init_from, and the sample printed at the end of training.

Every checkpoint carries the run's record (`checkpoint_record` in train_inputs.py writes it once,
at the start of training: the resolved config, the model config actually built, the task and its
label names, the tokenizer's hash, the prepared data's directory, the strategy and the versions).
`read_record` turns it into typed configs through the same schemas training used, so a value a
checkpoint lacks (one written before that option existed) takes the schema's default, never a
default copied here. Keys the current schemas no longer have are dropped, so older checkpoints
keep loading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from lmtrain.checkpoint import CheckpointError, expected_shapes, load_record, load_weights
from lmtrain.data.config import DataConfig
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.model.config import ModelConfig
from lmtrain.tasks.config import TaskConfig, TaskKind


def typed(schema: type, values: Optional[dict]) -> Any:
    """A config dataclass from the plain dict a checkpoint saved (checks included). Keys the schema
    does not know (a removed option) are dropped; missing keys take the schema's defaults."""
    from omegaconf import OmegaConf

    known = {f.name for f in dataclasses.fields(schema)}
    kept = {k: v for k, v in (values or {}).items() if k in known}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), kept))


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint says about the run that wrote it, typed."""

    ckpt: Path
    kind: TaskKind
    model: ModelConfig
    """The model actually built (its vocabulary from the data, or the backbone's shape)."""
    task: TaskConfig
    data: DataConfig
    trainer: Any
    """lmtrain.config.TrainerConfig."""
    tokenizer_hash: str
    eos_token: Optional[str]
    data_dir: Optional[Path]
    """The prepared data the run trained on (pretraining tasks)."""
    label_names: list[str] = field(default_factory=list)
    """classify: the name of each class id."""
    step: int = 0
    """The optimizer step the checkpoint was written at."""
    strategy: Optional[str] = None
    world_size: Optional[int] = None
    version: Optional[str] = None
    """The lmtrain version that wrote it."""
    seed: int = 0
    raw: dict = field(default_factory=dict, repr=False)
    """The record as saved (for what is not typed here, e.g. the W&B run id)."""


def read_record(ckpt: str | Path) -> RunRecord:
    """The typed record of any checkpoint (a file, a ZeRO or an FSDP directory); reads no weights."""
    from lmtrain.config import TrainerConfig

    ckpt = Path(ckpt)
    saved = load_record(ckpt)
    raw = saved["lmtrain"]
    config = raw.get("config") or {}
    task_info = raw.get("task") or {}
    kind = TaskKind[task_info.get("kind", "causal_lm")]  # checkpoints from before tasks existed: causal_lm
    if "model_config" not in raw or "tokenizer_hash" not in raw:
        raise CheckpointError(f"checkpoint {ckpt} has no model config or tokenizer hash in its lmtrain record; "
                              "it was not written by `lmtrain train`")
    return RunRecord(
        ckpt=ckpt, kind=kind, model=typed(ModelConfig, raw["model_config"]), task=typed(TaskConfig, config.get("task")),
        data=typed(DataConfig, config.get("data")), trainer=typed(TrainerConfig, config.get("trainer")),
        tokenizer_hash=raw["tokenizer_hash"], eos_token=raw.get("eos_token"),
        data_dir=Path(raw["data_dir"]) if raw.get("data_dir") else None,
        label_names=list(task_info.get("label_names") or []), step=int(saved.get("global_step", 0)),
        strategy=raw.get("strategy"), world_size=raw.get("world_size"), version=raw.get("version"),
        seed=int(config.get("seed", 0)), raw=raw,
    )


@dataclass
class TrainedModel:
    """A checkpoint's task module (the LightningModule training ran, so the same forward) with its
    weights, in eval mode on one device, and the run's tokenizer."""

    module: Any
    """lmtrain.tasks.base.TaskModule."""
    run: RunRecord
    tokenizer: Tokenizer

    @property
    def model(self):
        """The plain Transformer (lmtrain.model.Transformer)."""
        return self.module.model

    @property
    def kind(self) -> TaskKind:
        return self.run.kind

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def specials(self):
        from lmtrain.data.examples import Specials

        return Specials.of(self.tokenizer, self.kind.name)


def load_trained(ckpt: str | Path, device: str = "auto", *, run: Optional[RunRecord] = None) -> TrainedModel:
    """Any checkpoint as a TrainedModel: the record, the task module with every weight of the
    checkpoint (nothing initialised fresh: a missing tensor is an error), and the tokenizer the run
    trained with (its hash checked)."""
    from lmtrain.inference import load_run_tokenizer, resolve_device
    from lmtrain.optim import OptimConfig, ScheduleConfig
    from lmtrain.tasks import make_task

    run = run or read_record(ckpt)
    tokenizer = load_run_tokenizer(ckpt, run.raw)
    module = make_task(run.task, run.model, OptimConfig(), ScheduleConfig(), tokenizer=tokenizer,
                       label_names=run.label_names or None, max_steps=1, seed=run.seed, grad_clip=0.0, accumulate=1,
                       record=run.raw)
    weights = load_weights(Path(ckpt))
    _, aliases = expected_shapes(module)
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt} does not match its own {run.kind.name} model config: {e}") from e
    if missing := [k for k in result.missing_keys if k not in aliases]:
        raise CheckpointError(f"checkpoint {ckpt} lacks {len(missing)} tensors of its own {run.kind.name} model: {missing[:5]}")
    return TrainedModel(module.to(resolve_device(device)).eval(), run, tokenizer)
