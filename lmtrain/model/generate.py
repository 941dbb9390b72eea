"""Autoregressive sampling with a KV cache: prefill the prompt once, then one token per step."""

from typing import Optional

import torch
from torch import Tensor, nn

from lmtrain.model.attention import KVCache


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Continue prompts idx (B, T0) int64 with a `Transformer`; returns (B, T0 + n) int64.

    n <= max_new_tokens: generation stops early once every row has produced eos_id, and rows
    that finished earlier keep emitting eos_id. temperature 0 is greedy (argmax); otherwise
    logits / temperature are filtered by top_k, then top_p (nucleus), and sampled with
    `generator`. Ids >= vocab_size (padding rows) are never produced.
    Raises ValueError when T0 + max_new_tokens > max_seq_len (the prompt is not cropped: crop
    it yourself to keep the last max_seq_len - max_new_tokens tokens).
    The model runs in eval mode; its previous mode is restored afterwards.
    With model.attention=document the rows are read as training windows are: an eos in the prompt, or a
    generated one, ends a document that later tokens do not read; a prompt without eos is one document.
    """
    cfg = model.cfg
    if not cfg.causal:
        raise ValueError(
            "this model is a bidirectional encoder (model.causal=false): it fills in masked tokens but cannot "
            "generate text left to right; use a causal model (e.g. task=causal_lm or task=translate)"
        )
    batch, prompt_len = idx.shape
    _check_generate_args(prompt_len, max_new_tokens, cfg.max_seq_len, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return idx
    was_training = model.training
    model.eval()
    try:
        kv_cache = KVCache(cfg.n_layers, max_len=prompt_len + max_new_tokens)
        logits = model(idx, start_pos=0, kv_cache=kv_cache)[:, -1]  # (B, V_padded)
        finished = torch.zeros(batch, dtype=torch.bool, device=idx.device)
        new_tokens = []
        for step in range(max_new_tokens):
            next_id = sample_next_token(
                logits, cfg.vocab_size, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )  # (B,)
            if eos_id is not None:
                next_id = torch.where(finished, torch.full_like(next_id, eos_id), next_id)
                finished |= next_id == eos_id
            new_tokens.append(next_id)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            logits = model(next_id[:, None], start_pos=prompt_len + step, kv_cache=kv_cache)[:, -1]
    finally:
        model.train(was_training)
    return torch.cat((idx, torch.stack(new_tokens, dim=1)), dim=1)


def sample_next_token(
    logits: Tensor,
    vocab_size: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick one id per row from logits (B, V_padded); returns (B,) int64, every id < vocab_size."""
    logits = logits.float().clone()
    logits[:, vocab_size:] = float("-inf")  # padding rows of the lm head are not tokens
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, min(top_k, vocab_size))
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the row's k-th largest to -inf (ties with the k-th are kept)."""
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely ids whose probabilities sum to >= p (Holtzman et al. 2019)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely ids
    drop_sorted = mass_before >= p  # the most likely id always has mass_before 0 and stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _check_generate_args(
    prompt_len: int,
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
) -> None:
    if prompt_len == 0:
        raise ValueError("generate got an empty prompt (0 tokens): pass at least one token, e.g. BOS or EOS")
    if prompt_len > max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens exceeds model.max_seq_len={max_seq_len}: "
            f"keep at most its last {max_seq_len} tokens"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative: pass 0 or more")
    if prompt_len + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"model.max_seq_len={max_seq_len}: keep the last {max(max_seq_len - max_new_tokens, 0)} "
            "prompt tokens or lower max_new_tokens"
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative: use 0 for greedy or a positive value")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]: use e.g. 0.9 (or None to disable)")
