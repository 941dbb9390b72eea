"""A trained task back from its checkpoint, for `lmtrain eval` and `lmtrain predict`: the same
LightningModule (so the same forward as in training) with the checkpoint's weights, its
tokenizer, and its task and data configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lmtrain.checkpoint import CheckpointError, expected_shapes, load_record, load_weights
from lmtrain.data.config import DataConfig
from lmtrain.data.examples import Collate, Features, Specials, build_features, load_splits
from lmtrain.data.tokenizers import Tokenizer, special_id
from lmtrain.inference import load_run_tokenizer, model_config_from_record, resolve_device, task_kind
from lmtrain.optim import OptimConfig, ScheduleConfig
from lmtrain.tasks import make_task
from lmtrain.tasks.base import TaskModule
from lmtrain.tasks.config import TaskConfig, TaskKind


def typed_from_record(schema: type, values: dict) -> Any:
    """A config dataclass rebuilt from the plain dict saved in a checkpoint (checks included)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))


@dataclass
class LoadedTask:
    task: TaskModule
    kind: TaskKind
    record: dict
    tokenizer: Tokenizer
    task_cfg: TaskConfig
    data_cfg: DataConfig
    seq_len: int
    micro_batch_size: int

    @property
    def device(self) -> torch.device:
        return next(self.task.parameters()).device

    def specials(self) -> Specials:
        return Specials.of(self.tokenizer, self.kind.name)


def load_task(ckpt: str | Path, device: str = "auto") -> LoadedTask:
    record = load_record(Path(ckpt))["lmtrain"]
    kind = TaskKind[task_kind(record)]
    config = record["config"]
    task_cfg = typed_from_record(TaskConfig, config.get("task", {}))
    model_cfg = model_config_from_record(record["model_config"])
    tokenizer = load_run_tokenizer(ckpt, record)
    task = make_task(task_cfg, model_cfg, OptimConfig(), ScheduleConfig(), tokenizer=tokenizer,
                     label_names=record.get("task", {}).get("label_names"), max_steps=1, seed=config.get("seed", 0),
                     grad_clip=0.0, accumulate=1, record=record)
    weights = load_weights(Path(ckpt))
    _, aliases = expected_shapes(task)
    result = task.load_state_dict(weights, strict=False)
    if missing := [k for k in result.missing_keys if k not in aliases]:
        raise CheckpointError(f"checkpoint {ckpt} lacks {len(missing)} tensors of its own {kind.name} model: {missing[:5]}")
    trainer = config.get("trainer", {})
    return LoadedTask(task.to(resolve_device(device)).eval(), kind, record, tokenizer, task_cfg,
                      typed_from_record(DataConfig, config.get("data", {})), int(trainer.get("seq_len", 256)),
                      int(trainer.get("micro_batch_size", 16)))


def val_features(loaded: LoadedTask, val_paths: list[str]) -> Features:
    """The run's validation examples (or those of val_paths), featurised as in training."""
    data = loaded.data_cfg
    if val_paths:
        data = typed_from_record(DataConfig, {**OmegaConf.to_container(OmegaConf.structured(data)),
                                              "val_paths": list(val_paths)})
    train_rows, val_rows = load_splits(data)
    if loaded.kind is TaskKind.classify:  # the checkpoint's label names, whatever today's train split holds
        from lmtrain.data.examples import classify_features, require_columns

        names = loaded.record["task"]["label_names"]
        require_columns(val_rows, {"label_column": data.label_column}, data, "val")
        as_strings = len(val_rows) > 0 and isinstance(val_rows[0][data.label_column], str)
        mapping = {name: i for i, name in enumerate(names)} if as_strings else None
        return classify_features(val_rows, loaded.tokenizer, data, loaded.task_cfg, loaded.seq_len, names, mapping, "val")
    _, val = build_features(loaded.kind, train_rows, val_rows, loaded.tokenizer, data, loaded.task_cfg, loaded.seq_len)
    return val


def batches(items: list[dict], kind: TaskKind, pad: int, size: int, device: torch.device):
    collate = Collate(kind, pad)
    for begin in range(0, len(items), size):
        chunk = [{**item, "index": begin + k} for k, item in enumerate(items[begin : begin + size])]
        yield {k: v.to(device) for k, v in collate(chunk).items()}


@torch.no_grad()
def evaluate_task(cfg) -> dict[str, float]:
    """`lmtrain eval` for masked_lm and the fine-tuned tasks (cfg: EvalConfig)."""
    loaded = load_task(cfg.ckpt, cfg.device)
    size = cfg.micro_batch_size or loaded.micro_batch_size
    if loaded.kind is TaskKind.masked_lm:
        result = evaluate_masked_lm(loaded, cfg.val_batches, size)
    else:
        val = val_features(loaded, cfg.val_paths)
        items = val.items if cfg.val_batches is None else val.items[: cfg.val_batches * size]
        pad = special_id(loaded.tokenizer, "<|pad|>", f"task={loaded.kind.name}")
        match loaded.kind:
            case TaskKind.classify:
                result = evaluate_classify(loaded, items, pad, size)
            case TaskKind.qa:
                result = evaluate_qa(loaded, val, items, pad, size)
            case TaskKind.translate:
                result = evaluate_translate(loaded, val, items, cfg.beam_size or loaded.task_cfg.beam_size)
    shown = (f"{k.removeprefix('val/')} {int(v) if float(v).is_integer() else round(v, 4)}" for k, v in result.items())
    print(f"{cfg.ckpt} ({loaded.kind.name}): " + " | ".join(shown), flush=True)
    return result


def evaluate_masked_lm(loaded: LoadedTask, val_batches: int | None, size: int) -> dict[str, float]:
    from lmtrain.data.prepare import load_prepared
    from lmtrain.evaluate import val_windows

    data_dir = Path(loaded.record["data_dir"])
    windows = val_windows(data_dir, load_prepared(data_dir).meta, loaded.seq_len, val_batches, size)
    loss_sum, correct, count = 0.0, 0, 0
    for i, batch in enumerate(torch.utils.data.DataLoader(windows, batch_size=size)):
        scores = loaded.task.masked_scores(batch[:, :-1].to(loaded.device), i)
        loss_sum, correct, count = loss_sum + scores[0].item(), correct + int(scores[1]), count + int(scores[2])
    return {"val/loss": loss_sum / max(1, count), "val/masked_acc": correct / max(1, count), "val/masked_tokens": float(count)}


def evaluate_classify(loaded: LoadedTask, items: list[dict], pad: int, size: int) -> dict[str, float]:
    from lmtrain.tasks.finetune import classification_scores, confusion_counts

    n = len(loaded.record["task"]["label_names"])
    confusion = torch.zeros(n, n, dtype=torch.float64)
    loss_sum = 0.0
    for batch in batches(items, loaded.kind, pad, size, loaded.device):
        logits = loaded.task(batch)
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        confusion += confusion_counts(batch["labels"], logits.argmax(-1), n).cpu()
    return {"val/loss": loss_sum / max(1, len(items)), **classification_scores(confusion), "val/examples": float(len(items))}


def evaluate_qa(loaded: LoadedTask, val: Features, items: list[dict], pad: int, size: int) -> dict[str, float]:
    from lmtrain.tasks.finetune import keep_best
    from lmtrain.tasks.metrics import squad_scores

    best: dict = {}
    for batch in batches(items, loaded.kind, pad, size, loaded.device):
        start, end = loaded.task(batch)
        for row, (s, e) in enumerate(zip(start.float().cpu(), end.float().cpu())):
            keep_best(best, items[int(batch["index"][row])], s, e, val.references, loaded.task_cfg.max_answer_tokens)
    examples = sorted({item["example"] for item in items})
    scores = squad_scores({k: text for k, (_, text) in best.items()}, {k: val.references[k][1] for k in examples})
    return {"val/exact_match": scores["exact_match"], "val/f1": scores["f1"], "val/examples": float(len(examples))}


def translate(loaded: LoadedTask, prompt: list[int], beam_size: int) -> str:
    from lmtrain.inference import decode_text
    from lmtrain.model.decoding import beam_search

    ids = beam_search(loaded.task.model, prompt, loaded.task_cfg.max_target_tokens, loaded.tokenizer.eos_id,
                      beam_size=beam_size)
    return decode_text(loaded.tokenizer, ids)


def evaluate_translate(loaded: LoadedTask, val: Features, items: list[dict], beam_size: int) -> dict[str, float]:
    from lmtrain.tasks.metrics import corpus_bleu

    hypotheses = [translate(loaded, item["ids"][: item["prompt_len"]], beam_size) for item in items]
    return {"val/bleu": corpus_bleu(hypotheses, val.references[: len(items)]), "val/examples": float(len(items)),
            "val/beam_size": float(beam_size)}
