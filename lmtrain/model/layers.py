"""Building blocks without attention: norms, MLPs and position encodings."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.model.config import MLPKind, Norm


def build_norm(kind: Norm, dim: int, *, eps: float, bias: bool) -> nn.Module:
    match kind:
        case Norm.rmsnorm:
            return nn.RMSNorm(dim, eps=eps)
        case Norm.layernorm:
            return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"unknown model.norm={kind!r}: use one of {', '.join(Norm.__members__)}")


class MLP(nn.Module):
    """Position-wise feed-forward: d_model -> hidden -> d_model.

    swiglu: down(silu(gate(x)) * up(x)) (Shazeer 2020, https://arxiv.org/abs/2002.05202).
    gelu: the tanh approximation, as GPT-2 uses. gelu_exact: the erf form, as BERT uses (the two
    differ by up to ~5e-4, enough to move an imported BERT's logits). relu: as the original Transformer.
    `down` is the residual output projection that `Transformer.init_weights` scales down.
    """

    def __init__(self, kind: MLPKind, d_model: int, hidden: int, *, bias: bool) -> None:
        super().__init__()
        if not isinstance(kind, MLPKind):
            raise ValueError(f"unknown model.mlp={kind!r}: use one of {', '.join(MLPKind.__members__)}")
        self.kind = kind
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.gate = nn.Linear(d_model, hidden, bias=bias) if kind is MLPKind.swiglu else None
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind is MLPKind.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(activation(self.kind, self.up(x)))


def activation(kind: MLPKind, x: Tensor) -> Tensor:
    """The elementwise activation of a non-gated MLP kind."""
    match kind:
        case MLPKind.gelu:
            return F.gelu(x, approximate="tanh")
        case MLPKind.gelu_exact:
            return F.gelu(x)
        case MLPKind.relu:
            return F.relu(x)
    raise ValueError(f"model.mlp={kind.name} has no single elementwise activation; use gelu, gelu_exact or relu")


class LMHeadTransform(nn.Module):
    """BERT's masked-LM head transform before the vocabulary projection: norm(act(dense(x))),
    (B, T, d_model) -> (B, T, d_model); the activation is the MLP's."""

    def __init__(self, kind: MLPKind, norm: Norm, d_model: int, *, eps: float, bias: bool) -> None:
        super().__init__()
        self.kind = kind
        self.dense = nn.Linear(d_model, d_model, bias=bias)
        self.norm = build_norm(norm, d_model, eps=eps, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(activation(self.kind, self.dense(x)))


def compute_rope_cos_sin(
    seq_len: int, head_dim: int, *, theta: float, start_pos: int = 0, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for positions start_pos .. start_pos + seq_len - 1.

    Returns two float32 tensors of shape (seq_len, head_dim), each frequency written twice
    (first half, second half) to match `apply_rope`'s rotate-half layout.
    Computed per forward rather than kept as a buffer: a buffer would be cast to bf16 by
    `model.to(torch.bfloat16)` (losing the angles of far positions) and left as garbage by
    `to_empty()` after meta-device construction.
    """
    positions = torch.arange(start_pos, start_pos + seq_len, device=device, dtype=torch.float32)
    return compute_rope_cos_sin_at(positions, head_dim, theta=theta)


def compute_rope_cos_sin_at(positions: Tensor, head_dim: int, *, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles at positions (...) of any shape (e.g. (B, T) positions within
    documents); two float32 tensors (..., head_dim), laid out as `compute_rope_cos_sin`'s."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, T, D) by the angles whose cos/sin are (T, D), or
    (B, 1, T, D) when each row has its own positions.

    The rotate-half pairing (GPT-NeoX, Hugging Face Llama) rather than interleaved pairs
    (original RoFormer/Meta code): equivalent up to a permutation of q/k rows, and it maps onto
    Hugging Face Llama weights without one. Computed in at least float32, returned in x's dtype.
    """
    x_float = x.to(torch.promote_types(x.dtype, torch.float32))
    first, second = x_float.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x_float * cos + rotated * sin).type_as(x)


def compute_sinusoidal_table(max_seq_len: int, d_model: int, *, device: torch.device | None = None) -> Tensor:
    """The fixed encoding of Vaswani et al. 2017, section 3.5, shape (max_seq_len, d_model) float32.

    pe[pos, 2i] = sin(pos / 10000^(2i / d_model)), pe[pos, 2i + 1] = cos(same angle).
    """
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    angles = torch.outer(positions, inv_freq)  # (T, ceil(d_model / 2))
    table = torch.zeros(max_seq_len, d_model, device=device)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : d_model // 2]  # an odd d_model has one fewer cos column
    return table
