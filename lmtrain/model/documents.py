"""Document masking for packed windows (model.attention=document): a token reads only the earlier tokens
of its own document and, with model.document_positions, its position counts from its document's first token.

A packed window holds documents back to back, each ending with the eos token: token i belongs to
document "number of eos tokens strictly before i" (an eos is the last token of its document; the token
after it opens the next). Two kernels apply the same mask: FlexAttention with a block mask, which skips
the blocks no query may read, and SDPA with an explicit boolean mask (B, 1, T, S).
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lmtrain.model.config import DocumentKernel

if TYPE_CHECKING:
    from lmtrain.model.attention import KVCache


class DocumentMask:
    """Which keys each query of one forward may read; built once per forward, shared by every layer.

    query_ids (B, T) and key_ids (B, S) int64: the document of each query and key position. The queries
    are the last T of the S key positions (S > T when a KV cache holds earlier positions).
    block_mask: FlexAttention's form of the same mask, or None where the SDPA kernel is used.
    """

    def __init__(self, query_ids: Tensor, key_ids: Tensor, block_mask: Optional[BlockMask] = None) -> None:
        self.query_ids = query_ids
        self.key_ids = key_ids
        self.block_mask = block_mask

    def allowed(self) -> Tensor:
        """(B, 1, T, S) bool, True where query t may read key s: s is not after t and is in t's document."""
        q_len, kv_len = self.query_ids.shape[1], self.key_ids.shape[1]
        device = self.query_ids.device
        query_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        key_pos = torch.arange(kv_len, device=device)
        causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        same_document = self.query_ids[:, :, None] == self.key_ids[:, None, :]  # (B, T, S)
        return (causal & same_document)[:, None]


def build_document_mask(
    idx: Tensor, eos_id: int, *, start_pos: int = 0, kv_cache: Optional["KVCache"] = None, flex: bool = False
) -> tuple[DocumentMask, Tensor]:
    """The documents of token ids idx (B, T) at positions start_pos .. start_pos + T - 1, and each token's
    position in its document (B, T) int64 (0 at a document's first token).

    With kv_cache, the documents of positions before start_pos come from it and those of idx are stored
    in it, so decoding one token at a time sees what one forward over the whole sequence sees (a
    generated eos closes its document). flex also builds FlexAttention's block mask (no cache only).
    """
    seq_len = idx.shape[1]
    is_eos = (idx == eos_id).long()
    eos_through = is_eos.cumsum(dim=1)  # (B, T): eos tokens at or before each position of idx
    if kv_cache is not None:
        eos_through = kv_cache.update_eos_counts(eos_through, start_pos)  # (B, S), S = start_pos + T
    elif start_pos:
        raise ValueError(
            f"model.attention=document with start_pos={start_pos} needs the kv_cache holding positions "
            f"0 .. {start_pos - 1}: their documents decide what these tokens may read"
        )
    query_ids = (eos_through[:, start_pos:] - is_eos).contiguous()  # (B, T): eos strictly before
    key_ids = F.pad(eos_through[:, :-1], (1, 0))  # (B, S)
    first_of_document = torch.searchsorted(key_ids, query_ids)  # (B, T): document ids never decrease
    positions = torch.arange(start_pos, start_pos + seq_len, device=idx.device) - first_of_document
    if flex and kv_cache is not None:
        raise ValueError("the FlexAttention block mask covers a whole window; with a KV cache use the sdpa kernel")
    block_mask = compute_block_mask(query_ids) if flex else None
    return DocumentMask(query_ids, key_ids, block_mask), positions


def compute_block_mask(document_ids: Tensor) -> BlockMask:
    """FlexAttention's causal same-document mask for one window's document ids (B, T)."""

    def causal_same_document(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (k <= q) & (document_ids[b, q] == document_ids[b, k])

    batch, seq_len = document_ids.shape
    return create_block_mask(causal_same_document, batch, None, seq_len, seq_len, device=document_ids.device)


def use_flex(kernel: DocumentKernel, device: torch.device, *, dropout_active: bool, needs_backward: bool) -> bool:
    """Whether a whole-window forward (no KV cache, no padding mask) takes the flex kernel."""
    match kernel:
        case DocumentKernel.flex:
            if device.type == "cpu" and needs_backward:
                raise ValueError(
                    f"model.document_kernel=flex: FlexAttention has no backward on CPU (torch {torch.__version__}); "
                    "use document_kernel=auto (sdpa on CPU) or sdpa, or run under torch.no_grad()"
                )
            return True
        case DocumentKernel.sdpa:
            return False
        case DocumentKernel.auto:
            # flex has no attention dropout; on CPU the SDPA mask is as fast and needs no compile.
            return device.type == "cuda" and not dropout_active
    raise ValueError(f"unknown model.document_kernel={kernel!r}: use one of {', '.join(DocumentKernel.__members__)}")


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, *, enable_gqa: bool) -> Tensor:
    """FlexAttention of q (B, H, T, D) over k, v (B, H_kv, T, D) under block_mask -> (B, H, T, D)."""
    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with warnings.catch_warnings():
        # Eager flex materialises the T x T scores, as the SDPA mask does; that is the CPU path anyway.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    # Compiled, flex is one fused kernel that skips masked blocks; eager, it is a slow reference.
    return torch.compile(flex_attention, dynamic=False)
