"""`lmtrain eval`: a checkpoint's metrics on its run's val split, for the task it was trained on:
causal_lm val loss, perplexity and bits per byte (and, with a word-level tokenizer, the word-level
perplexity and the share of <unk> words); masked_lm loss and masked-token accuracy;
classify accuracy and macro-F1; qa exact match and F1; translate BLEU."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lmtrain.config import EvalConfig
from lmtrain.data.prepare import load_prepared
from lmtrain.data.sampler import val_windows
from lmtrain.data.tokenizers import WordTokenizer
from lmtrain.tasks.config import TaskKind
from lmtrain.trained import load_trained, read_record


def run(cfg: EvalConfig) -> dict[str, float]:
    run_record = read_record(cfg.ckpt)
    if run_record.kind is TaskKind.causal_lm:
        return evaluate_causal_lm(cfg)
    from lmtrain.task_eval import evaluate_task

    return evaluate_task(cfg)


@torch.no_grad()
def evaluate_causal_lm(cfg: EvalConfig) -> dict[str, float]:
    trained = load_trained(cfg.ckpt, cfg.device)
    run_record = trained.run
    if run_record.data_dir is None:
        raise ValueError(f"checkpoint {cfg.ckpt} names no prepared data (its run was not pretraining), so there is no "
                         "val split to evaluate it on")
    if run_record.data.sources:  # a mixture: each source's val split, and their weighted mean
        return evaluate_mixture(cfg, trained)
    return evaluate_prepared(cfg, trained, run_record.data_dir)


def evaluate_prepared(cfg: EvalConfig, trained, data_dir: Path, name: str | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte on the val split of one prepared dataset (keys val/<name>/...
    when a mixture's source is named)."""
    model, run_record = trained.model, trained.run
    prepared = load_prepared(data_dir)
    meta = prepared.meta
    if meta.tokenizer_hash != run_record.tokenizer_hash:
        raise ValueError(f"{data_dir} was prepared with another tokenizer than checkpoint {cfg.ckpt} was trained with")
    seq_len = run_record.trainer.seq_len
    micro = cfg.micro_batch_size or run_record.trainer.micro_batch_size
    windows = val_windows(prepared.val, seq_len, cfg.val_batches, micro)
    n_windows = len(windows)
    loader = torch.utils.data.DataLoader(windows, batch_size=micro)
    device = next(model.parameters()).device
    tokenizer = trained.tokenizer
    unk_id = tokenizer.unk_id if isinstance(tokenizer, WordTokenizer) else None
    loss_sum, tokens, unk_targets = 0.0, 0, 0
    for batch in loader:
        batch = batch.to(device)
        logits = model(batch[:, :-1])
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        tokens += batch[:, 1:].numel()
        if unk_id is not None:
            unk_targets += int((batch[:, 1:] == unk_id).sum())
    loss = loss_sum / tokens
    key = "val/" if name is None else f"val/{name}/"
    result = {
        f"{key}loss": loss,
        f"{key}ppl": math.exp(min(loss, 50.0)),
        f"{key}bpb": loss / math.log(2) * meta.n_val_tokens / max(1, meta.val_bytes),
        f"{key}tokens": float(tokens),
    }
    what = cfg.ckpt if name is None else f"{cfg.ckpt} [{name}]"
    print(f"{what}: val loss {loss:.4f} | ppl {result[f'{key}ppl']:.2f} | {result[f'{key}bpb']:.4f} bits/byte "
          f"| {tokens:,} tokens ({n_windows} windows of {seq_len})", flush=True)
    if unk_id is not None:
        # One token per word and one eos per document (a line, for WikiText): the token-level perplexity
        # is the word-level one as PyTorch's word_language_model reports it. <unk> words are predicted
        # as one class, so it is comparable only between runs with the same vocabulary.
        result[f"{key}word_ppl"] = result[f"{key}ppl"]
        result[f"{key}unk_rate"] = unk_targets / tokens
        print(f"{what}: val/word_ppl {result[f'{key}word_ppl']:.2f} over {tokens:,} words and eos "
              f"({result[f'{key}unk_rate']:.2%} of them {tokenizer.unk_token}, vocabulary {tokenizer.vocab_size:,})",
              flush=True)
    return result


def evaluate_mixture(cfg: EvalConfig, trained) -> dict[str, float]:
    """Each source's val metrics (val/<source>/...) and val/loss, their mean weighted as in training."""
    sources = trained.run.data.sources
    total = sum(source.weight for source in sources)
    result: dict[str, float] = {}
    for source in sources:
        result.update(evaluate_prepared(cfg, trained, Path(source.prepared).expanduser(), name=source.name))
    result["val/loss"] = sum(source.weight / total * result[f"val/{source.name}/loss"] for source in sources)
    result["val/ppl"] = math.exp(min(result["val/loss"], 50.0))
    print(f"{cfg.ckpt}: val loss {result['val/loss']:.4f} (mixture-weighted over "
          f"{', '.join(f'{s.name} {s.weight / total:.1%}' for s in sources)})", flush=True)
    return result
