"""The model's own config: a validated dataclass that OmegaConf can use as a structured schema.

Only int/float/bool/str/Enum/Optional fields, because OmegaConf rejects Literal and Union.
Enum member names equal their values, because OmegaConf matches YAML strings by name.
"""

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Optional, TypeVar


class Positional(Enum):
    rope = "rope"
    learned = "learned"
    sinusoidal = "sinusoidal"


class Norm(Enum):
    rmsnorm = "rmsnorm"
    layernorm = "layernorm"


class Attention(Enum):
    causal = "causal"
    document = "document"


class DocumentKernel(Enum):
    auto = "auto"
    flex = "flex"
    sdpa = "sdpa"


class MLPKind(Enum):
    swiglu = "swiglu"
    gelu = "gelu"
    gelu_exact = "gelu_exact"
    relu = "relu"


@dataclass
class ModelConfig:
    """Shape and numerics of a Transformer: a decoder, or with causal=false an encoder (see `Transformer`)."""

    name: str = "tiny"
    """Preset name, for run names and logs; does not change the model."""

    vocab_size: Optional[int] = None
    """Real tokenizer vocabulary size; null = take it from the prepared data at build time."""

    pad_vocab_multiple: int = 64
    """Embedding and lm-head rows are padded up to a multiple of this (faster matmuls);
    padded ids are never sampled."""

    d_model: int = 256
    """Width of the residual stream."""

    n_layers: int = 4
    """Number of Transformer blocks."""

    n_heads: int = 4
    """Attention (query) heads per block; must divide d_model."""

    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; must divide n_heads; null = n_heads (plain multi-head)."""

    d_ff: Optional[int] = None
    """Hidden width of the MLP (for swiglu: of each of its two input projections); null = 4 * d_model."""

    max_seq_len: int = 256
    """Longest sequence (prompt plus generated tokens) the model accepts."""

    positional: Positional = Positional.rope
    """Position encoding: rope (rotary, on q and k), learned (an embedding table) or
    sinusoidal (fixed, Vaswani et al. 2017)."""

    norm: Norm = Norm.rmsnorm
    """Normalisation layer: rmsnorm or layernorm (layernorm has a bias iff `bias`)."""

    mlp: MLPKind = MLPKind.swiglu
    """MLP kind: swiglu (silu-gated, three matrices), gelu (tanh approximation, as GPT-2), gelu_exact
    (the erf form, as BERT's hidden_act=gelu) or relu."""

    tied_embeddings: bool = True
    """Share one matrix between the token embedding and the lm head."""

    bias: bool = False
    """Biases in linear layers and layernorms (the lm head has one only with lm_head_bias)."""

    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches, in training only; in [0, 1)."""

    pre_norm: bool = True
    """Norm before each sublayer (GPT-2 style) plus a final norm; false = post-norm
    (original Transformer: norm after each residual add), no final norm."""

    embedding_scale: bool = False
    """Multiply token embeddings by sqrt(d_model), as the original Transformer does."""

    rope_theta: float = 10000.0
    """Base of the rotary frequencies (only used with positional=rope)."""

    norm_eps: float = 1e-5
    """Epsilon added inside the norms."""

    causal: bool = True
    """true: a decoder (each position attends to itself and earlier ones; generates text).
    false: a bidirectional encoder (BERT-style; masked-LM pretraining, classification, QA)."""

    attention: Attention = Attention.causal
    """Which earlier tokens of the window a decoder's token reads: causal (all of them) or document (only
    those of its own document; a packed window holds documents back to back, each ending with eos_id, and
    the eos is its document's last token). document needs causal=true and eos_id."""

    document_positions: bool = True
    """With attention=document: positions (learned, sinusoidal or rotary) restart at 0 at each document's
    first token, so a document's logits are those it gets alone at the start of a window, wherever packing
    put it. Ignored with attention=causal."""

    document_kernel: DocumentKernel = DocumentKernel.auto
    """With attention=document, how the mask is applied (same result): flex (FlexAttention with a block mask;
    it skips blocks no query may read), sdpa (scaled_dot_product_attention with a (B, 1, T, S) boolean mask)
    or auto (flex on CUDA, else sdpa). sdpa is used whatever this says with a KV cache or a padding mask, and
    by auto while attention dropout is active. flex has no attention dropout (so flex needs dropout=0) and,
    in torch 2.13, no backward on CPU."""

    eos_id: Optional[int] = None
    """The token id that ends a document. Not set by hand: training fills it from the prepared data
    (`ModelConfig.with_eos`); a forward with attention=document refuses to run without it."""

    embedding_norm: bool = False
    """A norm (of kind `norm`) on the summed token, position and token-type embeddings, before the
    embedding dropout, as BERT has."""

    type_vocab_size: int = 0
    """Rows of a token-type (segment) embedding added to the token embeddings, as BERT's 2; 0 = none.
    Every token is type 0 unless forward is given token_type_ids."""

    lm_head_transform: bool = False
    """dense -> the MLP's activation -> norm between the final hidden states and the lm head, as
    BERT's masked-LM head; task heads (classify, qa) read the hidden states before it."""

    lm_head_bias: bool = False
    """A bias on the lm head (BERT's masked-LM head has one)."""

    init_std: float = 0.02
    """Standard deviation of the normal weight init; residual output projections use
    init_std / sqrt(2 * n_layers)."""

    def __post_init__(self) -> None:
        # YAML and the command line hand enum fields over as their names; OmegaConf may hand
        # them over as members already. Accept both, keep members.
        self.positional = _to_enum(Positional, self.positional, "positional")
        self.norm = _to_enum(Norm, self.norm, "norm")
        self.mlp = _to_enum(MLPKind, self.mlp, "mlp")
        self.attention = _to_enum(Attention, self.attention, "attention")
        self.document_kernel = _to_enum(DocumentKernel, self.document_kernel, "document_kernel")
        self._check_sizes()
        self._check_divisibility()
        self._check_documents()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} is outside [0, 1): use e.g. 0.0 (off) or 0.1")
        if self.type_vocab_size < 0:
            raise ValueError(f"model.type_vocab_size={self.type_vocab_size} is negative: use 0 (no token types) or e.g. 2")
        if self.lm_head_transform and self.mlp is MLPKind.swiglu:
            raise ValueError("model.lm_head_transform=true applies the MLP's activation, and mlp=swiglu has no single "
                             "one: use mlp=gelu_exact (BERT), gelu or relu, or lm_head_transform=false")

    def _check_sizes(self) -> None:
        for field in ("pad_vocab_multiple", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _require_positive(field, getattr(self, field))
        for field in ("vocab_size", "n_kv_heads", "d_ff"):
            value = getattr(self, field)
            if value is not None:
                _require_positive(field, value, or_null=True)
        for field in ("rope_theta", "norm_eps", "init_std"):
            _require_positive(field, getattr(self, field))

    def _check_divisibility(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}: "
                "choose n_heads so that d_model % n_heads == 0"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}: "
                "choose n_kv_heads so that n_heads % n_kv_heads == 0 (or null for n_heads)"
            )
        if self.positional is Positional.rope and self.head_dim % 2:
            raise ValueError(
                f"model.positional=rope needs an even head dim, but model.d_model={self.d_model} / "
                f"model.n_heads={self.n_heads} = {self.head_dim}: change d_model or n_heads, "
                "or use positional=learned or sinusoidal"
            )

    def _check_documents(self) -> None:
        if self.attention is Attention.document and not self.causal:
            raise ValueError(
                "model.attention=document masks attention to earlier tokens of the same document, but "
                "model.causal=false (a bidirectional encoder) has no earlier-only attention: use attention=causal "
                "(the default) for an encoder, or causal=true"
            )
        if self.document_kernel is DocumentKernel.flex and self.dropout > 0:
            raise ValueError(
                f"model.document_kernel=flex has no attention dropout, but model.dropout={self.dropout}: "
                "use document_kernel=auto (sdpa while dropout is active) or sdpa, or dropout=0.0"
            )
        if self.eos_id is None:
            return
        if self.eos_id < 0 or (self.vocab_size is not None and self.eos_id >= self.vocab_size):
            raise ValueError(
                f"model.eos_id={self.eos_id} is not a token id in [0, model.vocab_size={self.vocab_size}): "
                "leave eos_id null; training sets it from the prepared data's eos token"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """n_kv_heads with null resolved to n_heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """d_ff with null resolved to 4 * d_model."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_multiple: rows of the embedding and lm head."""
        if self.vocab_size is None:
            raise ValueError(
                "model.vocab_size is null, so the padded vocab size is unknown: "
                "set model.vocab_size or build the model from prepared data (ModelConfig.with_vocab)"
            )
        multiple = self.pad_vocab_multiple
        return -(-self.vocab_size // multiple) * multiple

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        """A copy with vocab_size set (validated again)."""
        return dataclasses.replace(self, vocab_size=vocab_size)

    def with_eos(self, eos_id: int) -> "ModelConfig":
        """A copy with eos_id, the token that ends each document of the prepared data, set (validated again)."""
        return dataclasses.replace(self, eos_id=eos_id)


E = TypeVar("E", bound=Enum)


def _to_enum(enum_type: type[E], value: object, field: str) -> E:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str) and value in enum_type.__members__:
        return enum_type[value]
    choices = ", ".join(enum_type.__members__)
    raise ValueError(f"model.{field}={value!r} is not a valid choice: use one of {choices}")


def _require_positive(field: str, value: float, or_null: bool = False) -> None:
    if value <= 0:
        hint = " (or null)" if or_null else ""
        raise ValueError(f"model.{field}={value} must be positive: set a value > 0{hint}")
