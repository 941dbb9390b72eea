"""What `lmtrain train` trains on, per task: the model config, the tokenizer, the data module and
the LightningModule. Pretraining tasks read data made by `lmtrain prepare`; fine-tuning tasks
read labelled examples with the tokenizer of the backbone they start from (init_from)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np

from lmtrain import __version__
from lmtrain.checkpoint import CheckpointError, expected_shapes, load_weights, shape_mismatches
from lmtrain.config import TrainConfig
from lmtrain.data.config import TokenizerKind
from lmtrain.data.datamodule import LMDataModule, LMSource, TaskDataModule
from lmtrain.data.prepare import DatasetMeta, PreparedData, load_prepared, prepared_dir
from lmtrain.data.tokenizers import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer, special_id
from lmtrain.distributed.config import StrategyKind
from lmtrain.distributed.parallelize import ParallelPlan, build_plan
from lmtrain.distributed.rank import say
from lmtrain.hf.backbone import hf_spec, load_hf_backbone
from lmtrain.model.config import Attention, ModelConfig
from lmtrain.tasks.base import TaskModule
from lmtrain.tasks import make_task
from lmtrain.tasks.config import TaskKind


@dataclass
class RunInputs:
    model_cfg: ModelConfig
    tokenizer: Tokenizer | None
    """Loaded for every task but causal_lm (which never needs it during training)."""
    tokenizer_hash: str
    eos_token: str
    datamodule: L.LightningDataModule
    description: str
    """The data, for the start-of-run line."""
    data_dir: Path | None = None
    """Prepared data (pretraining tasks)."""
    prepared: PreparedData | None = None
    tokens_per_byte: float | None = None
    """For bits per byte (causal_lm only)."""
    task_info: dict = dataclasses.field(default_factory=dict)
    """What inference needs besides the config: label names."""


def resolve_model_config(model: ModelConfig, vocab_size: int, source: str) -> ModelConfig:
    """The model's vocabulary from the tokenizer, or a check that the tokenizer fits the model's."""
    if model.vocab_size is None:
        return model.with_vocab(vocab_size)
    if vocab_size > model.vocab_size:
        raise ValueError(
            f"the tokenizer of {source} has {vocab_size} tokens, more than model.vocab_size={model.vocab_size} "
            f"of model={model.name}; set model.vocab_size={vocab_size} (or null to take it from the data), "
            "or prepare with a smaller tokenizer.vocab_size"
        )
    return model


def check_token_ids(train: np.ndarray, val: np.ndarray, meta: DatasetMeta, vocab_size: int, data_dir: Path) -> None:
    """Token ids must be < vocab_size: the recorded maximum, and a direct look at the first tokens
    (an out-of-range id would otherwise surface as a device-side assert far from its cause)."""
    probe = [int(a[: 1 << 20].max()) for a in (train, val) if len(a)]
    largest = max([meta.max_token_id, *probe])
    if largest >= vocab_size:
        raise ValueError(
            f"{data_dir} holds token id {largest}, out of range for a vocabulary of {vocab_size}; the data was "
            "prepared with another tokenizer or is damaged: prepare it again (lmtrain prepare ... force=true)"
        )


def check_step_size(global_batch: int, n_items: int, noun: str, source: str) -> None:
    """A step that reads more than the whole train split is a mistake (it looks hung for minutes
    per step on a big batch); one that reads a large part of it is worth a word."""
    if global_batch > n_items:
        raise ValueError(
            f"one optimizer step reads {global_batch:,} {noun} (trainer.global_batch_size, or micro_batch_size x "
            f"ranks), more than the {n_items:,} of the whole train split of {source}: every step would go through "
            f"the data {global_batch / n_items:.1f} times. Lower trainer.global_batch_size / trainer.micro_batch_size, "
            "or train on more data"
        )
    if global_batch * 10 > n_items:
        say(f"note: each step reads {global_batch:,} of the {n_items:,} train {noun} ({global_batch / n_items:.0%}): "
            f"an epoch every {n_items / global_batch:.1f} steps")


def pretraining_inputs(cfg: TrainConfig) -> RunInputs:
    tcfg = cfg.trainer
    sources = lm_sources(cfg)
    data_dir, prepared = sources[0].directory, load_prepared(sources[0].directory)
    meta = prepared.meta
    if spec := hf_spec(cfg.init_from):
        model_cfg = hf_pretraining_model(spec, meta, data_dir, tcfg.seq_len)
    else:
        model_cfg = resolve_model_config(cfg.model, meta.vocab_size, str(data_dir))
    if model_cfg.attention is Attention.document:  # documents end with the data's eos
        model_cfg = model_cfg.with_eos(meta.eos_id)
    for source in sources:
        source_meta = load_prepared(source.directory).meta
        check_token_ids(source.train, source.val, source_meta, model_cfg.vocab_size, source.directory)
    datamodule = LMDataModule(
        sources, seq_len=tcfg.seq_len, micro_batch_size=tcfg.micro_batch_size,
        global_batch_size=tcfg.resolved_global_batch_size(), seed=cfg.seed, val_batches=tcfg.val_batches,
        num_workers=tcfg.num_workers, mixture=bool(cfg.data.sources),
    )
    n_windows = sum(source.train_windows(tcfg.seq_len) for source in sources)
    check_step_size(tcfg.resolved_global_batch_size(), n_windows, f"windows of {tcfg.seq_len} tokens",
                    str(data_dir) if len(sources) == 1 else "the mixture")
    if datamodule.mixture:
        check_mixture_epochs(datamodule, tcfg.max_steps * tcfg.resolved_global_batch_size())
    tokenizer = None
    if cfg.task.kind is TaskKind.masked_lm:
        tokenizer = load_tokenizer(data_dir / TOKENIZER_FILE, eos_token=meta.eos_token)
    causal = cfg.task.kind is TaskKind.causal_lm
    n_train = sum(len(source.train) for source in sources)
    what = f"data {data_dir.name}" if len(sources) == 1 else f"mixture of {len(sources)} sources"
    return RunInputs(model_cfg, tokenizer, meta.tokenizer_hash, meta.eos_token, datamodule,
                     f"{what}: {n_train:,} train tokens", data_dir=data_dir, prepared=prepared,
                     tokens_per_byte=meta.n_val_tokens / max(1, meta.val_bytes) if causal and len(sources) == 1 else None)


def lm_sources(cfg: TrainConfig) -> list[LMSource]:
    """The prepared dataset of data.* and tokenizer.*, or each source of a mixture (data.sources),
    which must all have been tokenized alike."""
    if not cfg.data.sources:
        if cfg.data.name == "mixture":
            raise ValueError("data=mixture but data.sources is empty; set data.sources='[{name: web, prepared: "
                             "/path/to/prepared, weight: 0.7}, ...]' (each a directory made by lmtrain prepare)")
        directory = prepared_dir(cfg.data, cfg.tokenizer)
        prepared = load_prepared(directory)
        return [LMSource(cfg.data.name, directory, prepared.train, prepared.val)]
    sources, first = [], None
    for i, source in enumerate(cfg.data.sources):
        directory = Path(source.prepared).expanduser()
        prepared = load_prepared(directory)
        if first is None:
            first = (source.name, directory, prepared.meta)
        elif prepared.meta.tokenizer_hash != first[2].tokenizer_hash:
            raise ValueError(
                f"data.sources[{i}] {source.name} ({directory}) was tokenized with another tokenizer "
                f"({prepared.meta.tokenizer_kind}, sha256 {prepared.meta.tokenizer_hash[:12]}) than data.sources[0] "
                f"{first[0]} ({first[1]}: {first[2].tokenizer_kind}, sha256 {first[2].tokenizer_hash[:12]}): the same "
                "id would mean different tokens. Prepare every source with one tokenizer (tokenizer=pretrained "
                f"tokenizer.path={first[1]})")
        sources.append(LMSource(source.name, directory, prepared.train, prepared.val, weight=source.weight,
                                max_tokens=source.max_tokens, max_epochs=source.max_epochs))
    return sources


def check_mixture_epochs(datamodule: LMDataModule, n_samples: int) -> None:
    """Say how often each source is read over the run; refuse one over its max_epochs."""
    epochs = datamodule.sampler().epochs(n_samples)
    for source, n in zip(datamodule.sources, epochs):
        if source.max_epochs is not None and n > source.max_epochs:
            raise ValueError(
                f"data.sources {source.name}: trainer.max_steps reads it {n:.2f} times over (weight {source.weight} "
                f"of {sum(s.weight for s in datamodule.sources)}, {source.train_windows(datamodule.seq_len):,} windows), "
                f"more than its max_epochs={source.max_epochs}; lower its weight or trainer.max_steps, or raise "
                "max_epochs")
    shares = datamodule.val_weights()
    say("mixture: " + ", ".join(f"{s.name} {shares[s.name]:.1%} ({n:.2f} epochs)" for s, n in zip(datamodule.sources, epochs)))


def hf_pretraining_model(spec: str, meta: DatasetMeta, data_dir: Path, seq_len: int) -> ModelConfig:
    """The model of init_from=hf:<spec> for training on prepared data, which must have been tokenized
    with that model's own tokenizer."""
    backbone = load_hf_backbone(spec)
    if meta.tokenizer_hash != backbone.tokenizer.fingerprint():
        raise ValueError(
            f"{data_dir} was prepared with another tokenizer (sha256 {meta.tokenizer_hash[:12]}) than init_from=hf:{spec} "
            f"uses ({backbone.tokenizer.fingerprint()[:12]}, {backbone.model_dir / TOKENIZER_FILE}): the model would read "
            f"its token ids as other tokens. Prepare the data with it: tokenizer=pretrained "
            f"tokenizer.path={backbone.model_dir} (on both lmtrain prepare and lmtrain train)")
    if seq_len > backbone.model_cfg.max_seq_len:
        raise ValueError(f"trainer.seq_len={seq_len} exceeds the {backbone.model_cfg.max_seq_len} positions of "
                         f"init_from=hf:{spec}; lower trainer.seq_len")
    say(backbone.describe())
    return backbone.model_cfg


def finetune_tokenizer(cfg: TrainConfig) -> tuple[Tokenizer, ModelConfig]:
    """The backbone's tokenizer and architecture when starting from a checkpoint (as a Hugging
    Face from_pretrained does: the checkpoint's model config wins over model=...); otherwise a
    tokenizer that needs no corpus (byte or pretrained) and the configured model."""
    from lmtrain.inference import load_run_tokenizer
    from lmtrain.trained import read_record

    if spec := hf_spec(cfg.init_from):
        backbone = load_hf_backbone(spec)
        check_chosen_tokenizer(cfg, backbone.tokenizer)
        say(backbone.describe())
        return backbone.tokenizer, backbone.model_cfg
    if cfg.init_from:
        saved = read_record(cfg.init_from)
        tokenizer = load_run_tokenizer(cfg.init_from, saved.raw)
        check_chosen_tokenizer(cfg, tokenizer)
        model_cfg = saved.model
        if cfg.model.name != model_cfg.name:
            say(f"init_from: the backbone is the checkpoint's model ({model_cfg.name}); model={cfg.model.name} is not used")
        return tokenizer, model_cfg
    match cfg.tokenizer.kind:
        case TokenizerKind.byte:
            tokenizer = ByteTokenizer(cfg.tokenizer.eos_token)
        case TokenizerKind.pretrained:
            tokenizer = load_tokenizer(cfg.tokenizer.path, eos_token=cfg.tokenizer.eos_token)
        case _:
            raise ValueError(
                f"task={cfg.task.kind.name} without init_from needs a tokenizer that is not trained on a corpus: "
                f"tokenizer={cfg.tokenizer.kind.name} is trained by `lmtrain prepare`. Start from a pretrained backbone "
                "(init_from=runs/<pretrain>/checkpoints/last.ckpt), or use tokenizer=byte or tokenizer=pretrained"
            )
    return tokenizer, resolve_model_config(cfg.model, tokenizer.vocab_size, "the tokenizer")


def check_chosen_tokenizer(cfg: TrainConfig, backbone_tokenizer: Tokenizer) -> None:
    """tokenizer=pretrained next to init_from must name the backbone's own tokenizer."""
    if cfg.tokenizer.kind is not TokenizerKind.pretrained:
        return
    chosen = load_tokenizer(cfg.tokenizer.path, eos_token=cfg.tokenizer.eos_token)
    if chosen.fingerprint() != backbone_tokenizer.fingerprint():
        raise ValueError(
            f"tokenizer.path={cfg.tokenizer.path} is not the tokenizer init_from={cfg.init_from} was trained with "
            f"(sha256 {chosen.fingerprint()[:12]} vs {backbone_tokenizer.fingerprint()[:12]}): its token ids would mean "
            "other things to the backbone. Drop tokenizer=... to use the backbone's own"
        )


def pad_token_id(cfg: TrainConfig, tokenizer: Tokenizer) -> int:
    """<|pad|>; for a Hugging Face backbone whose tokenizer has none (GPT-2, Llama), eos, as HF
    fine-tuning does: padding is masked out of attention and loss, so its id is never read."""
    found = tokenizer.special_token_ids()
    if "<|pad|>" not in found and hf_spec(cfg.init_from):
        say(f"init_from={cfg.init_from}: its tokenizer has no <|pad|> token; padding uses eos ({tokenizer.eos_token})")
        return tokenizer.eos_id
    return special_id(tokenizer, "<|pad|>", f"task={cfg.task.kind.name}")


def finetune_inputs(cfg: TrainConfig) -> RunInputs:
    from lmtrain.data.examples import build_features, describe, load_splits

    tcfg, kind = cfg.trainer, cfg.task.kind
    tokenizer, model_cfg = finetune_tokenizer(cfg)
    if tcfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"trainer.seq_len={tcfg.seq_len} exceeds max_seq_len={model_cfg.max_seq_len} of the model "
                         f"{model_cfg.name}; lower trainer.seq_len")
    train_rows, val_rows = load_splits(cfg.data)
    train, val = build_features(kind, train_rows, val_rows, tokenizer, cfg.data, cfg.task, tcfg.seq_len)
    datamodule = TaskDataModule(
        train, val, kind=kind, pad_id=pad_token_id(cfg, tokenizer),
        micro_batch_size=tcfg.micro_batch_size, global_batch_size=tcfg.resolved_global_batch_size(), seed=cfg.seed,
        val_examples=cfg.task.val_examples, num_workers=tcfg.num_workers, tokenizer=tokenizer,
    )
    noun = "windows" if kind is TaskKind.qa else "examples"
    check_step_size(tcfg.resolved_global_batch_size(), len(train.items), noun, describe(cfg.data))
    description = (f"data {describe(cfg.data)}: {train.n_examples:,} train / {val.n_examples:,} val examples"
                   + (f" ({len(train.items):,} / {len(val.items):,} {noun})" if len(train.items) != train.n_examples else ""))
    return RunInputs(model_cfg, tokenizer, tokenizer.fingerprint(), tokenizer.eos_token, datamodule, description,
                     task_info={"label_names": train.label_names} if kind is TaskKind.classify else {})


def run_inputs(cfg: TrainConfig) -> RunInputs:
    return pretraining_inputs(cfg) if cfg.task.kind.pretraining else finetune_inputs(cfg)


def model_config_dict(model_cfg: ModelConfig) -> dict:
    """The model config as plain values (enums by name), as checkpoints and config.yaml hold it."""
    return {f.name: getattr(getattr(model_cfg, f.name), "value", getattr(model_cfg, f.name))
            for f in dataclasses.fields(model_cfg)}


def checkpoint_record(record: dict, inputs: RunInputs, kind: StrategyKind, world_size: int, task_kind: TaskKind) -> dict:
    """What every checkpoint carries besides tensors: enough to rebuild the model and its head,
    check the data and the layout on resume, and name the W&B run (added once known)."""
    model_cfg = inputs.model_cfg
    return {
        "version": __version__,
        "config": record,
        "model_config": model_config_dict(model_cfg),
        "task": {"kind": task_kind.name, **inputs.task_info},
        "tokenizer_hash": inputs.tokenizer_hash,
        "eos_token": inputs.eos_token,
        "data_dir": str(inputs.data_dir) if inputs.data_dir else None,
        "strategy": kind.name,
        "world_size": world_size,
    }


def build_task(cfg: TrainConfig, inputs: RunInputs, record: dict, plan: ParallelPlan | None = None) -> TaskModule:
    """plan: how the model is parallelized; None = built from cfg.strategy and cfg.trainer."""
    tcfg = cfg.trainer
    return make_task(cfg.task, inputs.model_cfg, cfg.optim, cfg.schedule, tokenizer=inputs.tokenizer,
                     label_names=inputs.task_info.get("label_names"), max_steps=tcfg.max_steps, seed=cfg.seed,
                     grad_clip=tcfg.grad_clip, accumulate=tcfg.accumulation(), record=record,
                     loss_chunk_tokens=tcfg.loss_chunk_tokens, plan=plan or build_plan(cfg.strategy, tcfg))


def init_weights_from(task: TaskModule, path: str, tokenizer_hash: str) -> None:
    """Weights only (any layout), into a run that starts at step 0 with a fresh optimizer. A task
    with a head loads the backbone (`model.*`) and starts its head fresh; what was not loaded and
    what the checkpoint holds beyond this model are reported. init_from=hf:<dir or hub id> loads a
    Hugging Face model's weights instead."""
    if spec := hf_spec(path):
        return init_weights_from_hf(task, spec, tokenizer_hash)
    from lmtrain.trained import read_record

    saved = read_record(path)
    if saved.tokenizer_hash != tokenizer_hash:
        raise CheckpointError(
            f"init_from={path} was trained with another tokenizer (sha256 {saved.tokenizer_hash[:12]}) than this run's "
            f"data ({tokenizer_hash[:12]}): its embeddings would read these token ids as other tokens. Prepare the data "
            "with the backbone's tokenizer (tokenizer=pretrained tokenizer.path=runs/<pretrain>/tokenizer)"
        )
    weights = load_weights(Path(path))
    if task.head_modules():
        weights = {k: v for k, v in weights.items() if k.startswith("model.")}
    shapes, aliases = expected_shapes(task)
    backbone = {k: v for k, v in shapes.items() if k.startswith("model.")} if task.head_modules() else shapes
    if problems := shape_mismatches(weights, backbone, aliases):
        raise CheckpointError(f"init_from={path} does not fit this model:\n  " + "\n  ".join(problems[:20]))
    task.load_state_dict(weights, strict=False)
    missing = sorted(k for k in shapes if k not in weights and k not in aliases)
    unexpected = sorted(k for k in load_weights_names(path) if k not in shapes)
    say(f"initialised {len(weights)} tensors from {path}"
        + (f"; new, freshly initialised: {summarize_names(missing)}" if missing else "")
        + (f"; in the checkpoint but not used: {summarize_names(unexpected)}" if unexpected else ""))
    saved_causal = saved.model.causal
    if saved_causal != task.model_cfg.causal:
        say(f"init_from: the checkpoint was trained as a {'decoder' if saved_causal else 'bidirectional encoder'}, "
            f"this run's model is a {'decoder' if task.model_cfg.causal else 'bidirectional encoder'}")


def init_weights_from_hf(task: TaskModule, spec: str, tokenizer_hash: str) -> None:
    from lmtrain.hf.backbone import load_hf_state

    backbone = load_hf_backbone(spec)
    if backbone.tokenizer.fingerprint() != tokenizer_hash:  # pretraining_inputs / finetune_tokenizer made sure
        raise CheckpointError(f"init_from=hf:{spec}: this run's tokenizer (sha256 {tokenizer_hash[:12]}) is not the model's "
                              f"{backbone.model_dir / TOKENIZER_FILE} ({backbone.tokenizer.fingerprint()[:12]})")
    weights = {f"model.{k}": v for k, v in load_hf_state(backbone).items()}
    shapes, aliases = expected_shapes(task)
    backbone_shapes = {k: v for k, v in shapes.items() if k.startswith("model.")}
    if problems := shape_mismatches(weights, backbone_shapes, aliases):
        raise CheckpointError(f"init_from=hf:{spec} does not fit this model:\n  " + "\n  ".join(problems[:20]))
    task.load_state_dict(weights, strict=False)
    fresh = sorted(k for k in shapes if k not in weights and k not in aliases)
    say(f"initialised {len(weights)} tensors from {backbone.model_dir}"
        + (f"; new, freshly initialised: {summarize_names(fresh)}" if fresh else ""))


def load_weights_names(path: str) -> list[str]:
    from lmtrain.checkpoint import param_shapes

    return list(param_shapes(Path(path)))


def summarize_names(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
