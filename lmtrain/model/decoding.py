"""Greedy and beam-search decoding of one prompt with a decoder and its KV cache (translation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmtrain.model.attention import KVCache


def _next_log_probs(model: nn.Module, ids: Tensor, start_pos: int, cache: KVCache) -> Tensor:
    logits = model(ids, start_pos=start_pos, kv_cache=cache)[:, -1].float()  # (B, V_padded)
    logits[:, model.cfg.vocab_size:] = float("-inf")  # padding rows are never produced
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int, *,
                  fixed_steps: bool = False) -> list[int]:
    """The argmax continuation of `prompt`, without the eos. fixed_steps runs all max_new_tokens
    forward passes even after eos (sharded models need the same number of passes on every rank)."""
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(prompt))
    if max_new_tokens <= 0:
        return []
    device = next(model.parameters()).device
    cache = KVCache(model.cfg.n_layers, max_len=len(prompt) + max_new_tokens)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    done = False
    log_probs = _next_log_probs(model, ids, 0, cache)
    for step in range(max_new_tokens):
        token = int(log_probs.argmax(-1))
        done = done or token == eos_id
        if not done:
            out.append(token)
        if (done and not fixed_steps) or step == max_new_tokens - 1:
            break
        log_probs = _next_log_probs(model, torch.tensor([[token]], device=device), len(prompt) + step, cache)
    return out


@torch.no_grad()
def beam_search(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int, *, beam_size: int,
                length_penalty: float = 1.0) -> list[int]:
    """The best finished hypothesis by log-probability / length**length_penalty (Wu et al. 2016's
    normalisation without the constant), without the eos; beam_size 1 is greedy."""
    if beam_size == 1:
        return greedy_decode(model, prompt, max_new_tokens, eos_id)
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(prompt))
    if max_new_tokens <= 0:
        return []
    device = next(model.parameters()).device
    cache = KVCache(model.cfg.n_layers, max_len=len(prompt) + max_new_tokens)
    log_probs = _next_log_probs(model, torch.tensor([prompt], dtype=torch.long, device=device), 0, cache)
    cache.select_rows(torch.zeros(beam_size, dtype=torch.long, device=device))  # one prompt, beam_size continuations of it
    scores = torch.zeros(1, device=device)  # one live beam until the first expansion
    beams: list[list[int]] = [[]]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        candidates = (scores[:, None] + log_probs[: len(beams)]).flatten()
        top_scores, top = candidates.topk(min(2 * beam_size, candidates.numel()))
        vocab = log_probs.shape[-1]
        next_beams, next_scores, parents = [], [], []
        for score, flat in zip(top_scores.tolist(), top.tolist()):
            parent, token = divmod(flat, vocab)
            tokens = beams[parent] + [token]
            if token == eos_id:
                finished.append((score / len(tokens) ** length_penalty, beams[parent]))
            elif len(next_beams) < beam_size:
                next_beams.append(tokens)
                next_scores.append(score)
                parents.append(parent)
            if len(next_beams) == beam_size:
                break
        best_alive = max(next_scores, default=float("-inf")) / (len(beams[0]) + 1) ** length_penalty
        if not next_beams or step == max_new_tokens - 1 or (
                len(finished) >= beam_size and max(f[0] for f in finished) >= best_alive):
            break
        index = torch.tensor(parents + [parents[0]] * (beam_size - len(parents)), device=device)
        cache.select_rows(index)
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        last = torch.tensor([[b[-1]] for b in beams] + [[beams[0][-1]]] * (beam_size - len(beams)), device=device)
        log_probs = _next_log_probs(model, last, len(prompt) + step, cache)
    if not finished:  # nothing reached eos within max_new_tokens: the best live beam
        finished = [(s / max(1, len(b)) ** length_penalty, b) for s, b in zip(next_scores, next_beams)]
    return max(finished, key=lambda f: f[0])[1]
