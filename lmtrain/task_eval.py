"""`lmtrain eval` of masked-LM and fine-tuned checkpoints, and the decoding `predict` shares. Each
reads the checkpoint through `lmtrain.trained.load_trained`: the LightningModule training ran (so the
same forward) with the checkpoint's weights, its tokenizer and its typed configs."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from lmtrain.data.config import DataConfig
from lmtrain.data.examples import Collate, Features, build_features, load_splits
from lmtrain.data.tokenizers import special_id
from lmtrain.tasks.config import TaskKind
from lmtrain.trained import TrainedModel, load_trained, typed


def val_features(loaded: TrainedModel, val_paths: list[str]) -> Features:
    """The run's validation examples (or those of val_paths), featurised as in training."""
    data = loaded.run.data
    if val_paths:
        data = typed(DataConfig, {**OmegaConf.to_container(OmegaConf.structured(data)), "val_paths": list(val_paths)})
    train_rows, val_rows = load_splits(data)
    if loaded.kind is TaskKind.classify:  # the checkpoint's label names, whatever today's train split holds
        from lmtrain.data.examples import classify_features, require_columns

        names = loaded.run.label_names
        require_columns(val_rows, {"label_column": data.label_column}, data, "val")
        as_strings = len(val_rows) > 0 and isinstance(val_rows[0][data.label_column], str)
        mapping = {name: i for i, name in enumerate(names)} if as_strings else None
        return classify_features(val_rows, loaded.tokenizer, data, loaded.run.task, loaded.run.trainer.seq_len, names,
                                 mapping, "val")
    _, val = build_features(loaded.kind, train_rows, val_rows, loaded.tokenizer, data, loaded.run.task,
                            loaded.run.trainer.seq_len)
    return val


def batches(items: list[dict], kind: TaskKind, pad: int, size: int, device: torch.device):
    collate = Collate(kind, pad)
    for begin in range(0, len(items), size):
        chunk = [{**item, "index": begin + k} for k, item in enumerate(items[begin : begin + size])]
        yield {k: v.to(device) for k, v in collate(chunk).items()}


@torch.no_grad()
def evaluate_task(cfg) -> dict[str, float]:
    """`lmtrain eval` for masked_lm and the fine-tuned tasks (cfg: EvalConfig)."""
    loaded = load_trained(cfg.ckpt, cfg.device)
    size = cfg.micro_batch_size or loaded.run.trainer.micro_batch_size
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
                result = evaluate_translate(loaded, val, items, cfg.beam_size or loaded.run.task.beam_size)
    shown = (f"{k.removeprefix('val/')} {int(v) if float(v).is_integer() else round(v, 4)}" for k, v in result.items())
    print(f"{cfg.ckpt} ({loaded.kind.name}): " + " | ".join(shown), flush=True)
    return result


def evaluate_masked_lm(loaded: TrainedModel, val_batches: int | None, size: int) -> dict[str, float]:
    from lmtrain.data.prepare import load_prepared
    from lmtrain.data.sampler import val_windows

    data_dir = loaded.run.data_dir
    windows = val_windows(load_prepared(data_dir).val, loaded.run.trainer.seq_len, val_batches, size)
    loss_sum, correct, count = 0.0, 0, 0
    for i, batch in enumerate(torch.utils.data.DataLoader(windows, batch_size=size)):
        indices = torch.arange(i * size, i * size + len(batch))
        scores = loaded.module.masked_scores(batch[:, :-1].to(loaded.device), indices)
        loss_sum, correct, count = loss_sum + scores[0].sum().item(), correct + int(scores[1].sum()), count + int(scores[2].sum())
    return {"val/loss": loss_sum / max(1, count), "val/masked_acc": correct / max(1, count), "val/masked_tokens": float(count)}


def evaluate_classify(loaded: TrainedModel, items: list[dict], pad: int, size: int) -> dict[str, float]:
    from lmtrain.tasks.finetune import classification_scores, confusion_counts

    n = len(loaded.run.label_names)
    confusion = torch.zeros(n, n, dtype=torch.float64)
    loss_sum = 0.0
    for batch in batches(items, loaded.kind, pad, size, loaded.device):
        logits = loaded.module(batch)
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        confusion += confusion_counts(batch["labels"], logits.argmax(-1), n).cpu()
    return {"val/loss": loss_sum / max(1, len(items)), **classification_scores(confusion), "val/examples": float(len(items))}


def evaluate_qa(loaded: TrainedModel, val: Features, items: list[dict], pad: int, size: int) -> dict[str, float]:
    from lmtrain.tasks.finetune import keep_best
    from lmtrain.tasks.metrics import squad_scores

    best: dict = {}
    for batch in batches(items, loaded.kind, pad, size, loaded.device):
        start, end = loaded.module(batch)
        for row, (s, e) in enumerate(zip(start.float().cpu(), end.float().cpu())):
            keep_best(best, items[int(batch["index"][row])], s, e, val.references, loaded.run.task.max_answer_tokens)
    examples = sorted({item["example"] for item in items})
    scores = squad_scores({k: text for k, (_, text) in best.items()}, {k: val.references[k][1] for k in examples})
    return {"val/exact_match": scores["exact_match"], "val/f1": scores["f1"], "val/examples": float(len(examples))}


def translate(loaded: TrainedModel, prompt: list[int], beam_size: int) -> str:
    from lmtrain.inference import decode_text
    from lmtrain.model.decoding import beam_search

    ids = beam_search(loaded.model, prompt, loaded.run.task.max_target_tokens, loaded.tokenizer.eos_id,
                      beam_size=beam_size)
    return decode_text(loaded.tokenizer, ids)


def evaluate_translate(loaded: TrainedModel, val: Features, items: list[dict], beam_size: int) -> dict[str, float]:
    from lmtrain.tasks.metrics import corpus_bleu

    hypotheses = [translate(loaded, item["ids"][: item["prompt_len"]], beam_size) for item in items]
    return {"val/bleu": corpus_bleu(hypotheses, val.references[: len(items)]), "val/examples": float(len(items)),
            "val/beam_size": float(beam_size)}
