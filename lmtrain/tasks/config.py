"""The `task` group: what is trained (the objective, the head, the metrics) on top of the model."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional


class TaskKind(Enum):
    causal_lm = "causal_lm"
    """Next-token prediction over packed token windows (GPT-style pretraining)."""
    masked_lm = "masked_lm"
    """Masked-token prediction over packed windows with a bidirectional encoder (BERT-style)."""
    classify = "classify"
    """Sequence classification: one label per text (or text pair)."""
    qa = "qa"
    """Extractive question answering on SQuAD-format data: a start and an end token in the context."""
    translate = "translate"
    """Source -> target with a decoder: source and target packed with a separator, loss on the target."""

    @property
    def pretraining(self) -> bool:
        """Trains on data made by `lmtrain prepare` (packed token windows), not on labelled examples."""
        return self in (TaskKind.causal_lm, TaskKind.masked_lm)


class Pooling(Enum):
    auto = "auto"
    """first for an encoder (its first token, bos, sees the whole text), last for a decoder."""
    first = "first"
    last = "last"
    """The last real token (a decoder's only position that has seen the whole text)."""
    mean = "mean"
    """The mean over real tokens."""


@dataclass
class TaskConfig:
    kind: TaskKind = TaskKind.causal_lm

    # -- masked_lm ------------------------------------------------------------------------------
    mask_prob: float = 0.15
    """masked_lm: fraction of tokens (or, with whole_word_mask, of words) chosen for prediction."""
    mask_token_prob: float = 0.8
    """masked_lm: of the chosen tokens, the fraction replaced by the mask token..."""
    random_token_prob: float = 0.1
    """masked_lm: ...and the fraction replaced by a random token; the rest stay as they are (80/10/10)."""
    whole_word_mask: bool = False
    """masked_lm: choose whole words (all tokens of a word together), not single tokens."""

    # -- fine-tuning heads ------------------------------------------------------------------------
    num_labels: Optional[int] = None
    """classify: number of classes; null = from the data (its ClassLabel feature, or the labels seen)."""
    pooling: Pooling = Pooling.auto
    """classify: which hidden state the classifier reads."""
    head_dropout: float = 0.1
    """classify, qa: dropout before the head."""
    freeze_backbone: bool = False
    """classify, qa: train only the new head; the pretrained Transformer stays as loaded."""
    layer_lr_decay: float = 1.0
    """classify, qa, translate: layer-wise LR decay. The head gets optim.lr, block i of L gets
    optim.lr * decay^(L - i), the embeddings optim.lr * decay^(L + 1); 1.0 = one LR for all."""

    val_examples: Optional[int] = None
    """classify, qa, translate: validate on the first N val examples; null = all of them (whatever
    the number of ranks; trainer.val_batches sizes only the pretraining tasks' validation)."""

    # -- qa -------------------------------------------------------------------------------------
    doc_stride: int = 64
    """qa: overlap in tokens between consecutive windows of a context longer than trainer.seq_len."""
    max_question_tokens: int = 64
    """qa: questions are cut to this many tokens."""
    max_answer_tokens: int = 30
    """qa: longest answer span considered when decoding."""

    # -- translate ------------------------------------------------------------------------------
    max_source_tokens: Optional[int] = None
    """translate: sources are cut to this many tokens; null = half of trainer.seq_len."""
    max_target_tokens: int = 64
    """translate: longest decoded target (validation, eval, generate)."""
    beam_size: int = 1
    """translate: beam width for eval and generate (1 = greedy)."""
    bleu_examples: int = 128
    """translate: val examples decoded for BLEU at each validation (all of them in `lmtrain eval`)."""

    def __post_init__(self) -> None:
        if isinstance(self.kind, str):
            self.kind = _member(TaskKind, self.kind, "task.kind")
        if isinstance(self.pooling, str):
            self.pooling = _member(Pooling, self.pooling, "task.pooling")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"task.mask_prob={self.mask_prob} must be in (0, 1); BERT uses 0.15")
        for name in ("mask_token_prob", "random_token_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"task.{name}={getattr(self, name)} must be in [0, 1]")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(
                f"task.mask_token_prob={self.mask_token_prob} + task.random_token_prob={self.random_token_prob} "
                "exceeds 1; BERT uses 0.8 and 0.1 (the other 0.1 keep their token)"
            )
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError(f"task.num_labels={self.num_labels} must be at least 2 (or null to take it from the data)")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"task.head_dropout={self.head_dropout} must be in [0, 1)")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ValueError(f"task.layer_lr_decay={self.layer_lr_decay} must be in (0, 1]; 1.0 turns it off, 0.8 is typical")
        for name in ("doc_stride", "max_question_tokens", "max_answer_tokens", "max_target_tokens", "beam_size",
                     "bleu_examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"task.{name}={getattr(self, name)} must be > 0")
        if self.val_examples is not None and self.val_examples <= 0:
            raise ValueError(f"task.val_examples={self.val_examples} must be > 0 (or null for all)")
        if self.max_source_tokens is not None and self.max_source_tokens <= 0:
            raise ValueError(f"task.max_source_tokens={self.max_source_tokens} must be > 0 (or null)")


def _member(enum_type, value: str, name: str):
    if value in enum_type.__members__:
        return enum_type[value]
    raise ValueError(f"{name}={value!r} is not one of {', '.join(enum_type.__members__)}")
