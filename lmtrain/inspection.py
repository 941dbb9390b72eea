"""What a trained model does with one text: attention maps, the logit lens, per-token surprisal and,
for a classifier, token attributions; computed here, drawn by `lmtrain.inspect_views`.

Nothing here touches the training forward. Forward hooks on each block record what it saw and
made during an ordinary forward (so the logits are the model's own, bit for bit), and the
attention weights are recomputed from the recorded q/k projections by
`SelfAttention.attention_probs`, since SDPA does not return them. The hooks only read activations,
never parameters, so this works on a model sharded by FSDP or ZeRO-3 as long as every rank runs
the forward.

- attention: per layer, (heads, T, T) softmax weights; row i is what query token i reads.
- logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): the residual stream after
  the embeddings and after each block, put through the final norm and the unembedding; the top
  tokens with their probabilities. The last layer's row is the model's own prediction.
- surprisal: -ln p(token) in nats, the training loss per token. A causal model predicts token t
  from tokens < t (a document-start eos goes first, so the first word is scored too); a masked
  model scores each token with only that token masked (pseudo-log-likelihood, Salazar et al. 2020).
- attributions (classify): integrated gradients (Sundararajan et al. 2017) of the predicted
  label's logit with respect to the token embeddings, from an all-zero embedding baseline,
  summed over the embedding dimension: one number per token. Their sum approximates
  logit(text) - logit(baseline); the difference is reported as `convergence_delta`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from lmtrain.checkpoint import resolve_checkpoint
from lmtrain.data.examples import Specials, classify_ids
from lmtrain.data.tokenizers import Tokenizer, special_id
from lmtrain.model.transformer import Block, Transformer
from lmtrain.tasks.config import TaskKind

LENS_TOP_K = 5


def blocks_of(model: nn.Module) -> list[Block]:
    """The Transformer blocks of `model`, in order (whatever wraps them)."""
    return [module for module in model.modules() if isinstance(module, Block)]


class Capture:
    """While the `with` lasts, every forward of `model` records each block's input and output and
    its attention's q/k projections. Only the last forward's records are kept."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.blocks = blocks_of(model)
        self.residual: list[Optional[Tensor]] = []
        self._attn_inputs: list[Optional[tuple]] = []
        self._qkv: list[Optional[Tensor]] = []
        self.attn_out: list[Optional[Tensor]] = []
        self._handles: list = []

    def __enter__(self) -> "Capture":
        n = len(self.blocks)
        self.residual, self.attn_out = [None] * (n + 1), [None] * n
        self._attn_inputs, self._qkv = [None] * n, [None] * n
        for i, block in enumerate(self.blocks):
            if i == 0:
                self._handles.append(block.register_forward_pre_hook(self._keep_embedded))
            self._handles.append(block.register_forward_hook(self._keeper(self.residual, i + 1)))
            self._handles.append(block.attn.register_forward_pre_hook(self._keeper_args(i)))
            self._handles.append(block.attn.qkv.register_forward_hook(self._keeper(self._qkv, i)))
            self._handles.append(block.attn.register_forward_hook(self._keeper(self.attn_out, i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep_embedded(self, module: nn.Module, args: tuple) -> None:
        self.residual[0] = args[0].detach()

    @staticmethod
    def _keeper(store: list, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            store[index] = output.detach()

        return hook

    def _keeper_args(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            # SelfAttention(x, rope, kv_cache, start_pos, key_mask, documents), called positionally by Block.
            rope = args[1] if len(args) > 1 else None
            key_mask = args[4] if len(args) > 4 else None
            documents = args[5] if len(args) > 5 else None
            self._attn_inputs[index] = (rope, key_mask, documents)

        return hook

    def attention(self) -> list[Tensor]:
        """Per layer, the attention weights (B, H, T, T) float32 of the last forward."""
        if any(qkv is None for qkv in self._qkv):
            raise RuntimeError("no forward ran inside Capture, so there is no attention to report")
        maps = []
        for block, qkv, (rope, key_mask, documents) in zip(self.blocks, self._qkv, self._attn_inputs):
            q, k, _ = block.attn.split_heads(qkv, rope)
            maps.append(block.attn.attention_probs(q, k, key_mask, documents))
        return maps

    def values(self, layer: int) -> Tensor:
        """Layer `layer`'s v heads (B, H_kv, T, D) of the last forward (tests rebuild the attention output from them)."""
        block = self.blocks[layer]
        rope = self._attn_inputs[layer][0]
        return block.attn.split_heads(self._qkv[layer], rope)[2]


@contextlib.contextmanager
def eager_blocks(model: nn.Module) -> Iterator[None]:
    """Run `Module.compile()`-d blocks eagerly for the duration: hooks added to a compiled block
    would otherwise make torch.compile guard on them and recompile the training graph."""
    compiled = {block: block._compiled_call_impl for block in blocks_of(model)
                if getattr(block, "_compiled_call_impl", None) is not None}
    for block in compiled:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, impl in compiled.items():
            block._compiled_call_impl = impl


@dataclass
class Inspection:
    """The numbers behind every picture, for one text (batch of one)."""

    kind: str
    """The checkpoint's task: causal_lm, masked_lm, classify, qa or translate."""
    ids: list[int]
    tokens: list[str]
    """Each id decoded on its own, whitespace made visible (the labels of every picture)."""
    attention: list[Tensor]
    """Per layer (H, T, T) float32."""
    lens_ids: Optional[Tensor] = None
    """(L + 1, T, LENS_TOP_K): the top token ids per layer (0 = embeddings) and position."""
    lens_probs: Optional[Tensor] = None
    """(L + 1, T, LENS_TOP_K): their probabilities."""
    predicted_ids: Optional[Tensor] = None
    """(T,): the model's own top next-token (or, masked, same-position) id: lens_ids[-1, :, 0]."""
    surprisal: Optional[list[Optional[float]]] = None
    """Per token, -ln p in nats (None where the model makes no prediction for it)."""
    prediction: Optional[dict] = None
    """classify: {"label", "label_id", "probabilities"}."""
    attributions: Optional[list[float]] = None
    """classify: per token, integrated gradients toward the predicted label."""
    convergence_delta: Optional[float] = None
    word_attributions: Optional[list[tuple[str, float]]] = None
    """classify: the attributions summed over each whitespace-separated word (specials on their own)."""
    notes: list[str] = field(default_factory=list)
    """What was not computed, and why."""


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each id as its own text, with whitespace made visible, for axis labels."""
    labels = []
    for token_id in ids:
        text = tokenizer.decode([token_id])
        shown = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text).strip()  # \n, \x04
        labels.append(shown or "␣" * max(1, len(text)))  # a whitespace-only token stays visible
    return labels


def words(tokenizer: Tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """The text's words and the token positions each spans: a word starts at a token whose text
    starts with whitespace or follows one that ends with it; a special token is a word of its own."""
    specials = set(tokenizer.special_token_ids().values())
    spans: list[tuple[str, list[int]]] = []
    previous, previous_special = "", True
    for position, token_id in enumerate(ids):
        text = tokenizer.decode([token_id])
        special = token_id in specials
        # Whitespace on its own (a byte tokenizer's space) opens the word that follows it.
        follows_space = previous[-1:].isspace() and not previous.isspace()
        if special or previous_special or text[:1].isspace() or follows_space:
            spans.append(("", []))
        word, positions = spans[-1]
        spans[-1] = (word + text, [*positions, position])
        previous, previous_special = text, special
    return [(word.strip() or word, positions) for word, positions in spans]


@torch.no_grad()
def logit_lens(model: Transformer, residual: list[Tensor], top_k: int = LENS_TOP_K) -> tuple[Tensor, Tensor]:
    """Top-k ids and probabilities (L + 1, T, k) of each recorded residual stream (batch row 0)
    through the final norm and the unembedding, over the real vocabulary (not its padding rows)."""
    vocab = model.cfg.vocab_size
    ids, probs = [], []
    for stream in residual:
        logits = model.compute_logits(model.norm(stream[:1])).float()[0, :, :vocab]  # (T, V)
        top = logits.softmax(-1).topk(min(top_k, vocab), dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
    return torch.stack(ids), torch.stack(probs)


def causal_surprisal(logits: Tensor, ids: list[int]) -> list[Optional[float]]:
    """-ln p(token t | tokens < t) for t >= 1 from logits (T, V) of one row; None for token 0."""
    log_probs = logits[:-1].float().log_softmax(-1)
    targets = torch.tensor(ids[1:], device=logits.device)
    return [None, *(-log_probs.gather(-1, targets[:, None])[:, 0]).tolist()]


@torch.no_grad()
def masked_surprisal(model: Transformer, ids: list[int], mask_id: int, skip: set[int]) -> list[Optional[float]]:
    """-ln p(token t | every other token) with only token t masked, one row per token (batched)."""
    device = next(model.parameters()).device
    n = len(ids)
    rows = torch.tensor(ids, device=device).repeat(n, 1)
    positions = torch.arange(n, device=device)
    rows[positions, positions] = mask_id
    log_probs = model(rows)[positions, positions, : model.cfg.vocab_size].float().log_softmax(-1)  # (T, V)
    scores = (-log_probs.gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0]).tolist()
    return [None if token_id in skip else score for token_id, score in zip(ids, scores)]


def run_on_embeddings(model: Transformer, forward: Callable[[Tensor], Tensor], ids: Tensor, embeddings: Tensor) -> Tensor:
    """forward(ids repeated per row of `embeddings`) with the token embeddings replaced by `embeddings` (N, T, D)."""
    handle = model.tok_embeddings.register_forward_hook(lambda module, args, output: embeddings)
    try:
        return forward(ids.expand(embeddings.shape[0], -1))
    finally:
        handle.remove()


def integrated_gradients(model: Transformer, forward: Callable[[Tensor], Tensor], ids: Tensor, target: int,
                         steps: int = 32) -> tuple[list[float], float]:
    """Per-token integrated gradients of output `target` of forward(ids) -> (N, n_outputs), with
    respect to the token embeddings of ids (1, T), from an all-zero embedding baseline, by the
    midpoint rule over `steps` points (one batch of `steps` rows).

    Returns the attributions and the convergence delta: sum(attributions) - (out(x) - out(baseline)),
    near 0 when `steps` is enough."""
    with torch.no_grad():
        embedded = model.tok_embeddings(ids)  # (1, T, D)
    alphas = (torch.arange(steps, device=ids.device, dtype=embedded.dtype) + 0.5) / steps
    scaled = (alphas[:, None, None] * embedded).requires_grad_(True)  # (steps, T, D)
    with torch.enable_grad():
        outputs = run_on_embeddings(model, forward, ids, scaled)
        (grads,) = torch.autograd.grad(outputs[:, target].sum(), scaled)
    attributions = (embedded[0] * grads.mean(0)).sum(-1)  # (T,)
    with torch.no_grad():
        ends = run_on_embeddings(model, forward, ids, torch.cat([torch.zeros_like(embedded), embedded]))[:, target]
    return attributions.tolist(), float(attributions.sum() - (ends[1] - ends[0]))


def is_sharded(model: nn.Module) -> bool:
    """True when parameters are split over ranks (FSDP2 DTensors, DeepSpeed ZeRO-3): then only a
    forward that every rank runs sees whole weights."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def input_ids(kind: TaskKind, tokenizer: Tokenizer, text: str, *, seq_len: int, max_seq_len: int) -> list[int]:
    """The ids a model of this task reads for `text`, as in training."""
    if not text:
        raise ValueError('text is empty; give the text to inspect, e.g. text="The cat sat on the mat."')
    match kind:
        case TaskKind.causal_lm | TaskKind.translate:
            ids = [tokenizer.eos_id, *tokenizer.encode(text)]  # from a document boundary, as training windows are
        case TaskKind.classify:
            ids = classify_ids(tokenizer.encode(text), None, Specials.of(tokenizer, kind.name), seq_len)
        case _:
            ids = tokenizer.encode(text)
    if len(ids) > max_seq_len:
        raise ValueError(f"text is {len(ids)} tokens long but the model reads at most model.max_seq_len={max_seq_len}; "
                         "inspect a shorter text")
    return ids


def inspect_text(task: nn.Module, kind: TaskKind, tokenizer: Tokenizer, text: str, *, seq_len: int,
                 label_names: Optional[list[str]] = None, ig_steps: int = 32) -> Inspection:
    """Every view that applies to a `kind` task for `text` (task: the TaskModule, in eval mode).
    On a sharded model every rank must call this (the forwards are collective); the logit lens and
    attributions, which need whole weights outside a forward, are then left out with a note."""
    model: Transformer = task.model
    ids = input_ids(kind, tokenizer, text, seq_len=seq_len, max_seq_len=model.cfg.max_seq_len)
    device = next(model.parameters()).device
    idx = torch.tensor([ids], device=device)
    mask = torch.ones_like(idx, dtype=torch.bool)
    classify = lambda rows: task({"input_ids": rows, "attention_mask": torch.ones_like(rows, dtype=torch.bool)})  # noqa: E731
    with Capture(model) as capture, torch.no_grad():
        output = classify(idx) if kind is TaskKind.classify else model(idx, attention_mask=None if model.cfg.causal else mask)
    result = Inspection(kind.name, ids, token_labels(tokenizer, ids), [a[0] for a in capture.attention()])
    sharded = is_sharded(model)
    language_model = kind in (TaskKind.causal_lm, TaskKind.masked_lm, TaskKind.translate)
    if language_model:
        result.predicted_ids = output[0, :, : model.cfg.vocab_size].argmax(-1)
        if sharded:
            result.notes.append("logit lens left out: the model is sharded over ranks (FSDP / ZeRO-3)")
        else:
            result.lens_ids, result.lens_probs = logit_lens(model, capture.residual)
        if kind is TaskKind.masked_lm:
            specials = set(tokenizer.special_token_ids().values())
            mask_id = special_id(tokenizer, "<|mask|>", "masked-LM surprisal")
            result.surprisal = masked_surprisal(model, ids, mask_id, specials)
        else:
            result.surprisal = causal_surprisal(output[0, :, : model.cfg.vocab_size], ids)
    else:
        result.notes.append(f"logit lens and surprisal left out: a {kind.name} model's output is its task head, not the vocabulary")
    if kind is TaskKind.classify:
        probs = output[0].float().softmax(-1)
        label = int(probs.argmax())
        names = label_names or [str(i) for i in range(len(probs))]
        result.prediction = {"label": names[label], "label_id": label,
                             "probabilities": dict(zip(names, probs.tolist()))}
        if sharded:
            result.notes.append("attributions left out: the model is sharded over ranks (FSDP / ZeRO-3)")
        else:
            result.attributions, result.convergence_delta = integrated_gradients(model, classify, idx, label, ig_steps)
            result.word_attributions = [(word, sum(result.attributions[i] for i in span))
                                        for word, span in words(tokenizer, ids)]
    return result


def run(cfg) -> Inspection:
    """`lmtrain inspect` (cfg: InspectConfig): the views of one text on a checkpoint, as PNGs and inspect.json."""
    from pathlib import Path

    from lmtrain.inspect_views import write_views
    from lmtrain.trained import load_trained

    loaded = load_trained(cfg.ckpt, cfg.device)
    result = inspect_text(loaded.module, loaded.kind, loaded.tokenizer, cfg.text, seq_len=loaded.run.trainer.seq_len,
                          label_names=loaded.run.label_names or None, ig_steps=cfg.ig_steps)
    ckpt = resolve_checkpoint(cfg.ckpt).resolve()  # last.ckpt names the step it points at
    out = Path(cfg.out) if cfg.out else ckpt.parent.parent / "inspect" / ckpt.stem
    written = write_views(result, loaded.tokenizer, out, title=f"{Path(cfg.ckpt).name} ({loaded.kind.name})")
    print(summary(result, loaded.tokenizer), flush=True)
    print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}", flush=True)
    return result


def summary(result: Inspection, tokenizer: Tokenizer) -> str:
    """A few lines for the terminal: the prediction, the mean surprisal, what was left out."""
    lines = [f"{len(result.ids)} tokens, {len(result.attention)} layers x {result.attention[0].shape[0]} heads"]
    if result.surprisal is not None:
        scored = [s for s in result.surprisal if s is not None]
        if scored:
            lines.append(f"mean surprisal {sum(scored) / len(scored):.3f} nats/token over {len(scored)} tokens")
    if result.predicted_ids is not None:
        lines.append("next token after the text: " + repr(tokenizer.decode([int(result.predicted_ids[-1])])))
    if result.prediction is not None:
        shown = ", ".join(f"{name} {p:.3f}" for name, p in result.prediction["probabilities"].items())
        lines.append(f"label {result.prediction['label']} ({shown})")
    if result.word_attributions is not None:
        top = sorted(result.word_attributions, key=lambda item: -abs(item[1]))[:5]
        lines.append(f"words that drove {result.prediction['label']!r} most: "
                     + ", ".join(f"{word!r} {value:+.3f}" for word, value in top)
                     + f"  (integrated gradients; convergence delta {result.convergence_delta:+.4f})")
    lines += result.notes
    return "\n".join(lines)
