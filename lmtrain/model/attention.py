"""Causal self-attention (with grouped-query heads) and the key/value cache used in generation."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.model.documents import DocumentMask, flex_document_attention
from lmtrain.model.layers import apply_rope


class LayerKVCache:
    """Keys and values of one layer for positions 0 .. max_len - 1.

    The buffers are allocated at the first `update`, with that call's batch size, kv heads,
    head dim, dtype and device, so the cache follows autocast and the model's device.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, D) at positions start_pos .. start_pos + T - 1.

        Returns the keys and values of positions 0 .. start_pos + T - 1, each (B, H_kv, S, D).
        """
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions but positions up to {end} were written: "
                "build KVCache with a larger max_len"
            )
        if self.k is None or self.v is None:
            batch, heads, _, head_dim = k.shape
            self.k = k.new_zeros(batch, heads, self.max_len, head_dim)
            self.v = v.new_zeros(batch, heads, self.max_len, head_dim)
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One `LayerKVCache` per block; `kv_cache[i]` is what block i receives."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.layers = [LayerKVCache(max_len) for _ in range(n_layers)]
        self.max_len = max_len
        self.eos_counts: Optional[Tensor] = None
        """(B, max_len) int64, attention=document only: eos tokens at or before each cached position."""

    def update_eos_counts(self, counts: Tensor, start_pos: int) -> Tensor:
        """Store counts (B, T) of eos tokens at or before each of positions start_pos .. start_pos + T - 1,
        counted from start_pos; returns the counts from position 0 of positions 0 .. start_pos + T - 1 (B, S)."""
        end = start_pos + counts.shape[1]
        if self.eos_counts is None:
            self.eos_counts = counts.new_zeros(counts.shape[0], self.max_len)
        if start_pos:
            counts = counts + self.eos_counts[:, start_pos - 1 : start_pos]
        self.eos_counts[:, start_pos:end] = counts
        return self.eos_counts[:, :end]

    def select_rows(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',) int64 of everything cached, in that order; beam search expands
        and reorders its hypotheses with it."""
        for layer in self.layers:
            layer.k, layer.v = layer.k.index_select(0, index), layer.v.index_select(0, index)
        if self.eos_counts is not None:
            self.eos_counts = self.eos_counts.index_select(0, index)

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)


class SelfAttention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`: causal (a decoder), causal
    within documents (a `DocumentMask`, also through FlexAttention) or bidirectional (an encoder), with
    an optional key-padding mask.

    `qkv` projects to [q heads | k heads | v heads] in one matmul; with n_kv_heads < n_heads
    each group of n_heads / n_kv_heads query heads shares one k/v head (GQA,
    https://arxiv.org/abs/2305.13245). `out_proj` is the residual output projection that
    `Transformer.init_weights` scales down.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, bias: bool, dropout: float,
                 causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def forward(
        self,
        x: Tensor,
        rope: Optional[tuple[Tensor, Tensor]] = None,
        kv_cache: Optional[LayerKVCache] = None,
        start_pos: int = 0,
        key_mask: Optional[Tensor] = None,
        documents: Optional[DocumentMask] = None,
    ) -> Tensor:
        """x (B, T, d_model) at positions start_pos .. start_pos + T - 1 -> (B, T, d_model).

        key_mask: (B, T) bool, True at real tokens: padding is never attended to. A decoder fed
        right-padded rows needs none (real tokens only look left).
        documents: with model.attention=document, the documents of queries and keys (a decoder only);
        its block mask, when it has one, selects FlexAttention.
        """
        batch, seq_len, _ = x.shape
        q, k, v = self.split_heads(self.qkv(x), rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)  # (B, H_kv, S, D), S = start_pos + T
        gqa = self.n_kv_heads != self.n_heads
        if documents is not None and documents.block_mask is not None and key_mask is None:
            out = flex_document_attention(q, k, v, documents.block_mask, enable_gqa=gqa)  # (B, H, T, D)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                **self._mask_args(seq_len, k.shape[2], x.device, key_mask, documents),
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=gqa,
            )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)  # (B, T, H * D)
        return self.out_proj(out)

    def split_heads(self, qkv: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """The qkv projection's output (B, T, (H + 2 H_kv) D) -> q (B, H, T, D), k and v (B, H_kv, T, D);
        q and k rotated when rope is given."""
        batch, seq_len, _ = qkv.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attention_probs(
        self, q: Tensor, k: Tensor, key_mask: Optional[Tensor] = None, documents: Optional[DocumentMask] = None
    ) -> Tensor:
        """The weights SDPA applies to v, made explicit: softmax(q k^T / sqrt(D)) over the keys a query
        may see; (B, H, T, S) float32. For inspection only (lmtrain.inspection): training never calls it.

        q (B, H, T, D) and k (B, H_kv, S, D) as `split_heads` returns them; with GQA each group of
        H / H_kv query heads reads the same k head, as SDPA's enable_gqa does."""
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        allowed = self._allowed(q.shape[2], k.shape[2], q.device, key_mask, documents)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(dim=-1)

    def _allowed(self, q_len: int, kv_len: int, device: torch.device, key_mask: Optional[Tensor],
                 documents: Optional[DocumentMask] = None) -> Optional[Tensor]:
        """The mask `_mask_args` gives SDPA as one bool tensor (True = may attend), or None for no mask.
        FlexAttention's block mask (when `forward` used it) allows exactly the same keys."""
        args = self._mask_args(q_len, kv_len, device, key_mask, documents)
        if args.get("is_causal"):
            return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        return args.get("attn_mask")

    def _mask_args(self, q_len: int, kv_len: int, device: torch.device, key_mask: Optional[Tensor],
                   documents: Optional[DocumentMask] = None) -> dict:
        if documents is not None:
            allowed = documents.allowed()  # (B, 1, T, S)
            return {"attn_mask": allowed if key_mask is None else allowed & key_mask[:, None, None, :]}
        if not self.causal:
            return {} if key_mask is None else {"attn_mask": key_mask[:, None, None, :]}  # (B, 1, 1, S)
        args = _causal_mask_args(q_len, kv_len, device)
        if key_mask is None:
            return args
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        return {"attn_mask": causal[None, None] & key_mask[:, None, None, :]}


# The decoder's name in earlier releases.
CausalSelfAttention = SelfAttention


def _causal_mask_args(q_len: int, kv_len: int, device: torch.device) -> dict:
    """SDPA mask arguments for queries that are the last q_len of kv_len positions."""
    if q_len == kv_len:
        return {"is_causal": True}
    if q_len == 1:
        return {}  # one new token sees every cached position
    # SDPA's is_causal aligns the mask to the top-left corner when q_len != kv_len, which is
    # wrong for a chunk appended to a cache: query i sits at position kv_len - q_len + i.
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    key_pos = torch.arange(kv_len, device=device)
    return {"attn_mask": key_pos[None, :] <= query_pos[:, None]}  # (T, S), True = may attend
