"""Masked language modelling (BERT, Devlin et al. 2019) with a bidirectional encoder.

Masks are drawn afresh for every batch (dynamic masking, as RoBERTa does) from the torch RNG,
which is reseeded at every micro step from (seed, step, micro step, rank): a resumed run masks
exactly what the uninterrupted run would have. Validation masks with its own fixed generator,
so its numbers are comparable across evaluations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.data.tokenizers import Tokenizer
from lmtrain.tasks.base import TaskModule
from lmtrain.tasks.config import TaskConfig

IGNORE = -100  # cross_entropy's ignore_index: positions that are not predicted


class VocabTables:
    """Per-id facts masking needs, as lookup tensors over the padded vocabulary."""

    def __init__(self, tokenizer: Tokenizer, padded_vocab_size: int, special_ids: list[int], mask_id: int) -> None:
        special = torch.zeros(padded_vocab_size, dtype=torch.bool)
        special[tokenizer.vocab_size:] = True  # padding rows are never drawn as random tokens
        special[list(special_ids)] = True
        starts_space = torch.zeros(padded_vocab_size, dtype=torch.bool)
        ends_space = torch.zeros(padded_vocab_size, dtype=torch.bool)
        for token_id in range(tokenizer.vocab_size):
            if special[token_id]:
                continue
            text = tokenizer.decode([token_id])
            starts_space[token_id] = text[:1].isspace()
            ends_space[token_id] = text[-1:].isspace()
        self.special, self.starts_space, self.ends_space = special, starts_space, ends_space
        self.random_ids = (~special).nonzero().flatten()
        self.mask_id = mask_id


def word_starts(ids: Tensor, special: Tensor, starts_space: Tensor, ends_space: Tensor) -> Tensor:
    """(B, T) bool: True where a token begins a word. A word begins at a token whose text starts
    with whitespace, after one that ends with whitespace, and at and after a special token."""
    starts = starts_space[ids] | special[ids]
    starts[:, 1:] |= ends_space[ids[:, :-1]] | special[ids[:, :-1]]
    starts[:, 0] = True
    return starts


def mask_tokens(ids: Tensor, cfg: TaskConfig, *, mask_id: int, special: Tensor, random_ids: Tensor,
                starts_space: Tensor | None = None, ends_space: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(inputs, labels) for token ids (B, T): labels hold the original id where a token is to be
    predicted and IGNORE elsewhere. Of the chosen tokens mask_token_prob become the mask token,
    random_token_prob a random (non-special) token, the rest stay. Special tokens are never chosen.
    With whole_word_mask (starts_space and ends_space given) whole words are chosen together."""
    draw = lambda: torch.rand(ids.shape, device=ids.device, generator=generator)  # noqa: E731 - one shape, one RNG
    if cfg.whole_word_mask:
        word = word_starts(ids, special, starts_space, ends_space).long().cumsum(1) - 1  # (B, T) word index
        chosen = (draw() < cfg.mask_prob).gather(1, word)  # one draw per word, read at each of its tokens
    else:
        chosen = draw() < cfg.mask_prob
    chosen &= ~special[ids]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = draw()
    to_mask = chosen & (action < cfg.mask_token_prob)
    to_random = chosen & (action >= cfg.mask_token_prob) & (action < cfg.mask_token_prob + cfg.random_token_prob)
    picks = torch.randint(len(random_ids), ids.shape, device=ids.device, generator=generator)
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids[picks], inputs)
    return inputs, labels


class MaskedLMTask(TaskModule):
    """Batches are packed windows (B, T + 1) int64 from `lmtrain prepare`; the first T tokens are used."""

    def __init__(self, *args, task_cfg: TaskConfig, vocab: VocabTables, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.model_cfg.causal:
            raise ValueError(
                f"task=masked_lm needs a bidirectional encoder but model={self.model_cfg.name} is causal; use "
                "model=bert_tiny or model=bert_base, or set model.causal=false"
            )
        self.task_cfg = task_cfg
        self.mask_id = vocab.mask_id
        for name in ("special", "starts_space", "ends_space", "random_ids"):
            self.register_buffer(f"_{name}", getattr(vocab, name), persistent=False)

    def draws_random_numbers(self) -> bool:
        return True  # the masking

    def masked(self, ids: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return mask_tokens(ids, self.task_cfg, mask_id=self.mask_id, special=self._special, random_ids=self._random_ids,
                           starts_space=self._starts_space, ends_space=self._ends_space, generator=generator)

    def training_loss(self, batch: Tensor) -> Tensor:
        inputs, labels = self.masked(batch[:, :-1])
        logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)

    def on_validation_epoch_start(self) -> None:
        self.start_source_val()
        self._val_correct = torch.zeros((), dtype=torch.float64, device=self.device)

    def masked_scores(self, ids: Tensor, windows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per row of ids (B, T): (loss sum, correct, predicted tokens) over fixed masks. Row i's mask
        depends only on (seed, windows[i]), its window's index in the validation subset, so every
        validation, on any number of ranks, and `lmtrain eval` score the same positions."""
        masked = [self.masked(row[None], torch.Generator(device=ids.device).manual_seed(self.seed * 7919 + int(w) * 104_729))
                  for row, w in zip(ids, windows.tolist())]
        inputs, labels = torch.cat([m[0] for m in masked]), torch.cat([m[1] for m in masked])
        logits = self.model(inputs)
        picked = labels != IGNORE
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
        correct = ((logits.argmax(-1) == labels) & picked).sum(1)
        return losses.view(len(ids), -1).sum(1).double(), correct, picked.sum(1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss_sums, correct, counts = self.masked_scores(batch["ids"][:, :-1], batch["index"])
        self.add_source_val(batch["source"], loss_sums, counts)
        self._val_correct += correct[batch["source"] >= 0].sum()

    def on_validation_epoch_end(self) -> None:
        self.last_val = self.source_val_losses()
        counts = self.trainer.strategy.reduce(self._val_by_source[1].sum().clone(), reduce_op="sum")
        correct = self.trainer.strategy.reduce(self._val_correct.clone(), reduce_op="sum")
        self.last_val["val/ppl"] = math.exp(min(self.last_val["val/loss"], 50.0))
        self.last_val["val/masked_acc"] = (correct / counts.clamp(min=1)).item()
