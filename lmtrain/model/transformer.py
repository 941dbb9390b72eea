"""A Transformer language model, configured by `ModelConfig`: a decoder, or a bidirectional encoder.

Plain PyTorch: activation checkpointing, FSDP sharding and compile wrap `Transformer.blocks[i]`
from outside (lmtrain/distributed/), so each `Block` takes everything it needs as arguments.
"""

import math
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmtrain.model.attention import KVCache, LayerKVCache, SelfAttention
from lmtrain.model.config import Attention, ModelConfig, Positional
from lmtrain.model.documents import DocumentMask, build_document_mask, use_flex
from lmtrain.model.generate import generate_tokens
from lmtrain.model.layers import (
    MLP,
    LMHeadTransform,
    build_norm,
    compute_rope_cos_sin,
    compute_rope_cos_sin_at,
    compute_sinusoidal_table,
)


class Block(nn.Module):
    """Attention then MLP, each with a residual connection.

    pre-norm:  x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x))
    post-norm: x = attn_norm(x + attn(x));  x = mlp_norm(x + mlp(x))   (Vaswani et al. 2017)
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.pre_norm
        norm_args = dict(eps=cfg.norm_eps, bias=cfg.bias)
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, **norm_args)
        self.attn = SelfAttention(
            cfg.d_model, cfg.n_heads, cfg.kv_heads, bias=cfg.bias, dropout=cfg.dropout, causal=cfg.causal
        )
        self.mlp_norm = build_norm(cfg.norm, cfg.d_model, **norm_args)
        self.mlp = MLP(cfg.mlp, cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope: Optional[tuple[Tensor, Tensor]] = None,
        kv_cache: Optional[LayerKVCache] = None,
        start_pos: int = 0,
        key_mask: Optional[Tensor] = None,
        documents: Optional[DocumentMask] = None,
    ) -> Tensor:
        """x (B, T, d_model) -> (B, T, d_model).

        rope: (cos, sin), each (T, head_dim) float32, or (B, 1, T, head_dim) with positions within
        documents; None when positions are not rotary.
        kv_cache: this block's entry of a `KVCache` (generation only), or None.
        start_pos: position of x[:, 0]; with a cache, the number of positions already in it.
        key_mask: (B, T) bool, True at real (not padding) tokens, or None.
        documents: the documents of the window with model.attention=document, else None.
        """
        if self.pre_norm:
            x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, kv_cache, start_pos, key_mask, documents))
            return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.resid_dropout(self.attn(x, rope, kv_cache, start_pos, key_mask, documents)))
        return self.mlp_norm(x + self.resid_dropout(self.mlp(x)))


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, padded_vocab_size) float32.

    Build with `lmtrain.model.build_model(cfg)`, which also initialises the weights. To build
    on the meta device: construct under `torch.device("meta")`, shard, `to_empty(device=...)`,
    then call `init_weights()` (it also refills the sinusoidal table, a non-persistent buffer).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "model.vocab_size is null: set model.vocab_size or build from prepared data "
                "(cfg.with_vocab(tokenizer vocab size))"
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        if cfg.positional is Positional.learned:
            self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        if cfg.positional is Positional.sinusoidal:
            table = compute_sinusoidal_table(cfg.max_seq_len, cfg.d_model)
            self.register_buffer("sinusoidal_table", table, persistent=False)
        if cfg.type_vocab_size:
            self.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        if cfg.embedding_norm:
            self.embed_norm = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Post-norm blocks already end in a norm; a final one would normalise twice.
        if cfg.pre_norm:
            self.norm = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        else:
            self.norm = nn.Identity()
        if cfg.lm_head_transform:
            self.lm_head_transform = LMHeadTransform(cfg.mlp, cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=cfg.lm_head_bias)
        if cfg.tied_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """The one place weights are initialised (GPT-2 / nanoGPT scheme).

        Linears and embeddings ~ N(0, init_std), biases 0, norm weights 1; the residual output
        projections (attn.out_proj, mlp.down) ~ N(0, init_std / sqrt(2 * n_layers)) so the
        residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).

        Each parameter draws from its own generator, seeded by (seed, its name): its values do not
        depend on the order parameters are visited in or on how they are sharded. A sharded
        parameter (a DTensor: FSDP2 after a meta-device build) gets its rank's slice of the very
        tensor an unsharded build gets, one parameter at a time. seed: None = drawn from torch's
        global RNG.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        rules = self.init_rules()
        for name, param in self.named_parameters():  # a tied weight once, under its first name
            if name not in rules:
                raise RuntimeError(f"Transformer.init_weights has no rule for parameter {name}: add one to init_rules")
            fill_parameter(param, init_value(rules[name], param.shape, seed, name))
        if self.cfg.positional is Positional.sinusoidal:
            # to_empty() leaves non-persistent buffers uninitialised; copy_ keeps dtype and device.
            buffer = self.sinusoidal_table
            table = compute_sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model, device=buffer.device)
            buffer.copy_(table)

    def init_rules(self) -> dict[str, tuple[str, float]]:
        """Parameter name -> ("normal", std) | ("ones", 0) | ("zeros", 0)."""
        std = self.cfg.init_std
        rules: dict[str, tuple[str, float]] = {}
        for prefix, module in self.named_modules():
            at = f"{prefix}." if prefix else ""
            if isinstance(module, (nn.Linear, nn.Embedding)):
                rules[at + "weight"] = ("normal", std)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                rules[at + "weight"] = ("ones", 0.0)
            if getattr(module, "bias", None) is not None:
                rules[at + "bias"] = ("zeros", 0.0)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for i in range(self.cfg.n_layers):
            rules[f"blocks.{i}.attn.out_proj.weight"] = rules[f"blocks.{i}.mlp.down.weight"] = ("normal", residual_std)
        return rules

    def forward(
        self,
        idx: Tensor,
        *,
        start_pos: int = 0,
        kv_cache: Optional[KVCache] = None,
        attention_mask: Optional[Tensor] = None,
        hidden: bool = False,
        token_type_ids: Optional[Tensor] = None,
        targets: Optional[Tensor] = None,
        loss_chunk: int = 0,
    ) -> Tensor:
        """idx (B, T) int64 token ids at positions start_pos .. start_pos + T - 1.

        Returns logits (B, T, padded_vocab_size) float32; columns >= vocab_size belong to
        padding rows and should be ignored (generate masks them). With kv_cache, the keys and
        values of these positions are stored and earlier cached positions are attended to.
        attention_mask: (B, T) bool, True at real tokens; padding is never attended to.
        hidden=True returns the final hidden states (B, T, d_model) instead, for task heads
        (through forward, so FSDP's hooks on the root run).
        token_type_ids: (B, T) int64 segment ids below type_vocab_size; None = type 0 everywhere.
        targets: (B, T) int64 next-token ids: returns the summed cross entropy (fp32 scalar) instead
        of logits, computed loss_chunk positions at a time when loss_chunk > 0 (`chunked_loss_sum`).
        With model.attention=document, each token reads only its own document (documents end with
        model.eos_id; see lmtrain.model.documents); a KV cache carries the documents over between calls.
        """
        seq_len = idx.shape[1]
        if start_pos + seq_len > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {start_pos + seq_len} (start_pos={start_pos} + {seq_len} tokens) "
                f"exceeds model.max_seq_len={self.cfg.max_seq_len}: "
                "shorten the input or raise model.max_seq_len"
            )
        x = self.tok_embeddings(idx)  # (B, T, d_model)
        if self.cfg.embedding_scale:
            x = x * math.sqrt(self.cfg.d_model)
        if self.cfg.type_vocab_size:
            x = x + (self.type_embeddings.weight[0] if token_type_ids is None else self.type_embeddings(token_type_ids))
        elif token_type_ids is not None:
            raise ValueError("token_type_ids were given, but the model has no token-type embedding (model.type_vocab_size=0)")
        documents, positions = self._documents(idx, start_pos, kv_cache, attention_mask)
        x, rope = self._add_positions(x, start_pos, positions)
        if self.cfg.embedding_norm:
            x = self.embed_norm(x)
        x = self.embed_dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if kv_cache is None else kv_cache[i], start_pos, attention_mask, documents)
        if hidden:
            return self.norm(x)
        if targets is not None:
            return self.chunked_loss_sum(self.norm(x), targets, loss_chunk)
        return self.compute_logits(self.norm(x))

    def chunked_loss_sum(self, hidden: Tensor, targets: Tensor, chunk: int) -> Tensor:
        """Summed cross entropy of final hidden states (B, T, d_model) against targets (B, T).

        chunk > 0: `chunk` positions at a time, each under activation checkpointing, so no more than
        one chunk's fp32 logits (chunk x padded_vocab_size) exist at once, in forward or backward (the
        backward recomputes them); the full (B, T, V) logits and their gradient never do. gpt2_124m at
        16 x 1024 tokens: 3.3 GB of fp32 logits (and as much again for their gradient) become 0.8 GB
        per 4096-token chunk. The same sum as the plain path up to fp32 summation order."""
        flat_hidden, flat_targets = hidden.flatten(0, 1), targets.flatten()
        if chunk <= 0 or chunk >= len(flat_targets):
            return self._loss_sum(flat_hidden, flat_targets)
        total = flat_hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(flat_targets), chunk):
            part = slice(start, start + chunk)
            total = total + checkpoint(self._loss_sum, flat_hidden[part], flat_targets[part], use_reentrant=False)
        return total

    def _loss_sum(self, hidden: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.compute_logits(hidden), targets, reduction="sum")

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states (B, T, d_model), after `norm` -> logits (B, T, padded_vocab_size) float32."""
        if self.cfg.lm_head_transform:
            hidden = self.lm_head_transform(hidden)
        return self.lm_head(hidden).float()

    def _documents(
        self, idx: Tensor, start_pos: int, kv_cache: Optional[KVCache], attention_mask: Optional[Tensor]
    ) -> tuple[Optional[DocumentMask], Optional[Tensor]]:
        """With attention=document: the documents of idx and, with document_positions, each token's
        position within its document (B, T) int64; (None, None) with attention=causal."""
        cfg = self.cfg
        if cfg.attention is Attention.causal:
            return None, None
        if cfg.eos_id is None:
            raise ValueError(
                "model.attention=document needs model.eos_id, the token that ends each document, but it is null: "
                "train from prepared data (which sets it), call cfg.with_eos(tokenizer.eos_id), or use "
                "model.attention=causal"
            )
        flex = kv_cache is None and attention_mask is None and use_flex(
            cfg.document_kernel, idx.device, dropout_active=self.training and cfg.dropout > 0,
            needs_backward=torch.is_grad_enabled(),
        )
        documents, positions = build_document_mask(idx, cfg.eos_id, start_pos=start_pos, kv_cache=kv_cache, flex=flex)
        return documents, positions if cfg.document_positions else None

    def _add_positions(
        self, x: Tensor, start_pos: int, positions: Optional[Tensor] = None
    ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        """Add absolute position encodings to x, or return the rotary (cos, sin) for the blocks.

        positions: (B, T) int64 position of each token (within its document), or None for
        start_pos .. start_pos + T - 1 in every row."""
        where = slice(start_pos, start_pos + x.shape[1]) if positions is None else positions
        match self.cfg.positional:
            case Positional.rope:
                if positions is not None:
                    cos, sin = compute_rope_cos_sin_at(positions, self.cfg.head_dim, theta=self.cfg.rope_theta)
                    return x, (cos[:, None], sin[:, None])  # (B, 1, T, D): one set of angles for all heads
                rope = compute_rope_cos_sin(
                    x.shape[1],
                    self.cfg.head_dim,
                    theta=self.cfg.rope_theta,
                    start_pos=start_pos,
                    device=x.device,
                )
                return x, rope
            case Positional.learned:
                return x + self.pos_embeddings.weight[where], None
            case Positional.sinusoidal:
                return x + self.sinusoidal_table[where].to(x.dtype), None
        choices = ", ".join(Positional.__members__)
        raise ValueError(f"unknown model.positional={self.cfg.positional!r}: use one of {choices}")

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights once, without the padding rows of the vocab."""
        total = sum(p.numel() for p in self.parameters())
        padding_rows = self.cfg.padded_vocab_size - self.cfg.vocab_size
        vocab_matrices = 1 if self.cfg.tied_embeddings else 2
        return total - vocab_matrices * padding_rows * self.cfg.d_model - (padding_rows if self.cfg.lm_head_bias else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6 N + 12 L H Q T.

        PaLM, appendix B (https://arxiv.org/abs/2204.02311). N counts the parameters in matmuls:
        num_parameters() without the learned position table and, when untied, without the input
        embedding (a lookup, not a matmul); tied, the shared matrix counts once, as the lm head.
        """
        cfg = self.cfg
        n_matmul = self.num_parameters()
        if cfg.positional is Positional.learned:
            n_matmul -= cfg.max_seq_len * cfg.d_model
        n_matmul -= cfg.type_vocab_size * cfg.d_model  # a lookup too
        if not cfg.tied_embeddings:
            n_matmul -= cfg.vocab_size * cfg.d_model
        attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
        return float(6 * n_matmul + attention)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Continue prompts idx (B, T0) by up to max_new_tokens; returns (B, T0 + n) int64.

        See `lmtrain.model.generate.generate_tokens` for the contract (greedy at temperature 0,
        top-k then top-p, eos handling, and the ValueError when T0 + max_new_tokens exceeds
        max_seq_len: prompts are never cropped silently).
        """
        return generate_tokens(
            self,
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            generator=generator,
        )


def init_value(rule: tuple[str, float], shape: torch.Size, seed: int, name: str) -> Tensor:
    """The whole fp32 value of one parameter, on the CPU, from its own generator."""
    kind, std = rule
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def fill_parameter(param: Tensor, value: Tensor) -> None:
    """param := value; a DTensor parameter takes its rank's slice (each rank slices its own copy: no communication)."""
    if hasattr(param, "device_mesh"):  # a DTensor (FSDP2)
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)
