"""Fine-tuned tasks on labelled examples: sequence classification, extractive QA, translation.

Batches come from `lmtrain.data.examples.Collate`: input_ids and attention_mask (B, T), the
task's labels, "valid" (False for validation fillers that even out ranks) and "index" (the
item's position in the validation subset, for QA's host-side answer decoding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.data.examples import IGNORE, Features
from lmtrain.model.decoding import greedy_decode
from lmtrain.tasks.base import TaskModule
from lmtrain.tasks.config import TaskConfig
from lmtrain.tasks.heads import LinearHead, pool, resolve_pooling
from lmtrain.tasks.metrics import corpus_bleu, squad_scores


class _HeadTask(TaskModule):
    """A Transformer backbone plus a new linear head on its hidden states."""

    def __init__(self, *args, task_cfg: TaskConfig, n_outputs: int, **kwargs) -> None:
        super().__init__(*args, layer_lr_decay=task_cfg.layer_lr_decay, **kwargs)
        self.task_cfg = task_cfg
        self.head = LinearHead(self.model_cfg.d_model, n_outputs, dropout=task_cfg.head_dropout,
                               init_std=self.model_cfg.init_std)
        # The lm head is unused by a head task (DDP would wait for its gradient); tied, only its weight is
        # the embedding's. BERT's masked-LM transform and output bias are unused too.
        if not self.model_cfg.tied_embeddings:
            self.model.lm_head.requires_grad_(False)
        if self.model.lm_head.bias is not None:
            self.model.lm_head.bias.requires_grad_(False)
        if self.model_cfg.lm_head_transform:
            self.model.lm_head_transform.requires_grad_(False)
        if task_cfg.freeze_backbone:
            self.model.requires_grad_(False)

    def head_modules(self) -> list[torch.nn.Module]:
        return [self.head]

    def hidden(self, batch: dict) -> Tensor:
        # A decoder fed right-padded rows needs no mask: real tokens only look left.
        mask = None if self.model_cfg.causal else batch["attention_mask"]
        return self.model(batch["input_ids"], attention_mask=mask, hidden=True)

    def batch_tokens(self, batch: dict) -> Tensor:
        return batch["attention_mask"].sum()


class ClassifyTask(_HeadTask):
    def __init__(self, *args, task_cfg: TaskConfig, label_names: list[str], **kwargs) -> None:
        super().__init__(*args, task_cfg=task_cfg, n_outputs=len(label_names), **kwargs)
        self.label_names = label_names
        self.pooling = resolve_pooling(task_cfg.pooling, self.model_cfg.causal)

    def forward(self, batch: dict) -> Tensor:
        return self.head(pool(self.hidden(batch), batch["attention_mask"], self.pooling))  # (B, n_labels)

    def training_loss(self, batch: dict) -> Tensor:
        return F.cross_entropy(self(batch), batch["labels"])

    def on_validation_epoch_start(self) -> None:
        n = len(self.label_names)
        self._confusion = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        self._val_loss_sum.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch)
        valid = batch["valid"]
        self._val_loss_sum += F.cross_entropy(logits[valid], batch["labels"][valid], reduction="sum").double()
        self._confusion += confusion_counts(batch["labels"][valid], logits[valid].argmax(-1), len(self.label_names))

    def on_validation_epoch_end(self) -> None:
        confusion = self.trainer.strategy.reduce(self._confusion.clone(), reduce_op="sum")
        loss_sum = self.trainer.strategy.reduce(self._val_loss_sum.clone(), reduce_op="sum")
        self.last_val = {"val/loss": (loss_sum / confusion.sum().clamp(min=1)).item(),
                         **classification_scores(confusion.cpu())}


def confusion_counts(labels: Tensor, predicted: Tensor, n: int) -> Tensor:
    """(n, n) counts: rows the true class, columns the predicted one."""
    return torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)


def classification_scores(confusion: Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: true class, columns: predicted).
    Macro-F1 averages the per-class F1 over the classes that occur in the labels or predictions,
    as scikit-learn and torchmetrics do for classes with support."""
    true_pos = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    f1 = 2 * true_pos / (support + predicted).clamp(min=1)
    present = (support + predicted) > 0
    return {"val/accuracy": (true_pos.sum() / confusion.sum().clamp(min=1)).item(),
            "val/macro_f1": f1[present].mean().item() if present.any() else 0.0}


class QATask(_HeadTask):
    def __init__(self, *args, task_cfg: TaskConfig, **kwargs) -> None:
        super().__init__(*args, task_cfg=task_cfg, n_outputs=2, **kwargs)

    def forward(self, batch: dict) -> tuple[Tensor, Tensor]:
        logits = self.head(self.hidden(batch))  # (B, T, 2)
        padding = ~batch["attention_mask"]
        start, end = (logits[..., i].masked_fill(padding, float("-inf")) for i in (0, 1))
        return start, end

    def training_loss(self, batch: dict) -> Tensor:
        start, end = self(batch)
        return (F.cross_entropy(start, batch["start"]) + F.cross_entropy(end, batch["end"])) / 2

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum.zero_()
        self._val_tokens.zero_()
        self._items = self.trainer.datamodule.val_items()
        self._best: dict[int, tuple[float, str]] = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        start, end = self(batch)
        valid = batch["valid"]
        loss = F.cross_entropy(start[valid], batch["start"][valid], reduction="sum") + \
            F.cross_entropy(end[valid], batch["end"][valid], reduction="sum")
        self._val_loss_sum += loss.double() / 2
        self._val_tokens += valid.sum()
        references = self.trainer.datamodule.val.references
        for row, (s, e) in enumerate(zip(start.float().cpu(), end.float().cpu())):
            if not valid[row]:
                continue
            item = self._items[int(batch["index"][row])]
            keep_best(self._best, item, s, e, references, self.task_cfg.max_answer_tokens)

    def on_validation_epoch_end(self) -> None:
        loss_sum = self.trainer.strategy.reduce(self._val_loss_sum.clone(), reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_tokens.clone(), reduce_op="sum")
        best = merge_best(gather_objects(self.trainer, self._best))
        references = self.trainer.datamodule.val.references
        examples = {item["example"] for item in self._items}
        scores = squad_scores({k: text for k, (_, text) in best.items()}, {k: references[k][1] for k in examples})
        self.last_val = {"val/loss": (loss_sum / count.clamp(min=1)).item(),
                         "val/exact_match": scores["exact_match"], "val/f1": scores["f1"]}


def best_span(start: Tensor, end: Tensor, offsets: list, max_answer_tokens: int) -> tuple[float, int, int] | None:
    """(score, first, last) of the highest start + end logit span inside the context, with
    first <= last < first + max_answer_tokens; None when the window has no context token."""
    context = torch.tensor([o is not None for o in offsets] + [False] * (len(start) - len(offsets)))
    if not context.any():
        return None
    n = len(start)
    scores = start[:, None] + end[None, :]  # (T, T): [first, last]
    first, last = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (last >= first) & (last < first + max_answer_tokens) & context[:, None] & context[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    flat = int(scores.argmax())
    return float(scores.flatten()[flat]), flat // n, flat % n


def keep_best(best: dict, item: dict, start: Tensor, end: Tensor, references: list, max_answer_tokens: int) -> None:
    """Record the item's best span as its example's answer when it beats the example's other windows."""
    found = best_span(start, end, item["offsets"], max_answer_tokens)
    if found is None:
        return
    score, first, last = found
    example = item["example"]
    if example not in best or score > best[example][0]:
        context = references[example][0]
        best[example] = (score, context[item["offsets"][first][0] : item["offsets"][last][1]].strip())


def merge_best(per_rank: list[dict]) -> dict:
    merged: dict = {}
    for best in per_rank:
        for example, (score, text) in best.items():
            if example not in merged or score > merged[example][0]:
                merged[example] = (score, text)
    return merged


def gather_objects(trainer, obj) -> list:
    """Every rank's `obj` (a collective where there are several ranks)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


class TranslateTask(TaskModule):
    """A decoder trained on <|bos|> source <|sep|> target <|endoftext|> with the loss on the target."""

    def __init__(self, *args, task_cfg: TaskConfig, eos_id: int, **kwargs) -> None:
        super().__init__(*args, layer_lr_decay=task_cfg.layer_lr_decay, **kwargs)
        if not self.model_cfg.causal:
            raise ValueError(f"task=translate decodes left to right and needs a causal model, but model={self.model_cfg.name} "
                             "has model.causal=false")
        self.task_cfg, self.eos_id = task_cfg, eos_id

    def forward(self, batch: dict) -> Tensor:
        return self.model(batch["input_ids"])

    def training_loss(self, batch: dict) -> Tensor:
        return F.cross_entropy(self(batch).flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def batch_tokens(self, batch: dict) -> Tensor:
        return batch["attention_mask"].sum()

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum.zero_()
        self._val_tokens.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        labels = batch["labels"].masked_fill(~batch["valid"][:, None], IGNORE)
        self._val_loss_sum += F.cross_entropy(self(batch).flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                              reduction="sum").double()
        self._val_tokens += (labels != IGNORE).sum()

    def on_validation_epoch_end(self) -> None:
        loss_sum = self.trainer.strategy.reduce(self._val_loss_sum.clone(), reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens.clone(), reduce_op="sum")
        loss = (loss_sum / tokens.clamp(min=1)).item()
        bleu = self.validation_bleu(self.trainer.datamodule.val)
        self.last_val = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/bleu": bleu}

    def validation_bleu(self, val: Features) -> float:
        """Greedy BLEU on the first task.bleu_examples val examples, decoded in shards across ranks.
        With several ranks every rank runs the same number of forward passes (sharded strategies
        gather parameters in each)."""
        from lmtrain.inference import decode_text

        n = min(self.task_cfg.bleu_examples, len(val.items))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = {}
        for k in range(-(-n // world)):
            i = rank + k * world
            item = val.items[i if i < n else 0]
            ids = greedy_decode(self.model, item["ids"][: item["prompt_len"]], self.task_cfg.max_target_tokens,
                                self.eos_id, fixed_steps=world > 1)
            if i < n:
                mine[i] = decode_text(self.trainer.datamodule.tokenizer, ids)
        hypotheses = {}
        for part in gather_objects(self.trainer, mine):
            hypotheses.update(part)
        order = sorted(hypotheses)
        return corpus_bleu([hypotheses[i] for i in order], [val.references[i] for i in order])
