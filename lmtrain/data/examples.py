"""Labelled examples for fine-tuning: load the train and val splits through HF `datasets`, check
the columns a task needs, and turn rows into token-id features the task's collate pads into batches.

Sequences are built with lmtrain's reserved special tokens (see `lmtrain.data.tokenizers`):
- classify:  <|bos|> text [<|sep|> pair]
- qa:        <|bos|> question <|sep|> context window <|endoftext|>
- translate: <|bos|> source <|sep|> target <|endoftext|>  (the loss covers target and eos only)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from lmtrain.data.config import DataConfig, SourceKind
from lmtrain.data.prepare import compute_split
from lmtrain.data.tokenizers import DEFAULT_EOS_TOKEN, Tokenizer, special_id
from lmtrain.tasks.config import TaskConfig, TaskKind

if TYPE_CHECKING:
    import datasets

IGNORE = -100


@dataclass
class Specials:
    bos: int
    sep: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer: Tokenizer, task: str) -> "Specials":
        purpose = f"task={task}"
        return cls(bos=special_id(tokenizer, "<|bos|>", purpose), sep=special_id(tokenizer, "<|sep|>", purpose),
                   eos=tokenizer.eos_id, pad=special_id(tokenizer, "<|pad|>", purpose))


@dataclass
class Features:
    """One split's features and what is needed to score them."""

    items: list[dict]
    """Per feature: "ids" (list of ints) plus the task's labels; see each featurizer."""
    n_examples: int
    label_names: list[str] = field(default_factory=list)
    """classify: the name of each class id (strings from the data, or the ClassLabel names)."""
    references: list[Any] = field(default_factory=list)
    """qa: per example (context, [answer texts]); translate: per example the reference text."""


# -- loading --------------------------------------------------------------------------------------
def load_splits(cfg: DataConfig) -> tuple["datasets.Dataset", "datasets.Dataset"]:
    """(train, val) rows. Val comes from data.val_paths or data.hub_val_split when set, else a
    deterministic held-out data.val_fraction of the train rows."""
    import datasets

    from lmtrain.data.sources import load_hub_split, load_local_table

    datasets.disable_progress_bars()
    if cfg.source in (SourceKind.python_stdlib, SourceKind.text):
        raise ValueError(
            f"data.source={cfg.source.name} holds plain text without labels; fine-tuning tasks read json, csv, "
            "parquet or hub datasets (e.g. data=sst2, or data.source=json data.paths=[train.jsonl])"
        )
    scratch = str(Path(cfg.cache_dir).expanduser() / "hf_examples")  # datasets' Arrow cache of local files, reused
    if cfg.source is SourceKind.hub:
        train = load_hub_split(cfg, cfg.hub_split)
        val = load_hub_split(cfg, cfg.hub_val_split) if cfg.hub_val_split else None
    else:
        train = load_local_table(cfg, cfg.paths, scratch)
        val = load_local_table(cfg, cfg.val_paths, scratch) if cfg.val_paths else None
    if cfg.max_documents is not None:
        train = train.select(range(min(cfg.max_documents, len(train))))
    if val is None:
        train_rows, val_rows = compute_split(len(train), cfg.val_fraction, cfg.split_seed)
        train, val = train.select(train_rows), train.select(val_rows)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"the {'train' if len(train) == 0 else 'val'} split of {describe(cfg)} is empty; add examples")
    return train, val


def describe(cfg: DataConfig) -> str:
    if cfg.source is SourceKind.hub:
        return f"hub dataset {cfg.hub_name} ({cfg.hub_config or 'default'})"
    return f"{cfg.source.name} files {list(cfg.paths)}"


def require_columns(rows: "datasets.Dataset", columns: dict[str, Optional[str]], cfg: DataConfig, split: str) -> None:
    for key, column in columns.items():
        if column is not None and column not in rows.column_names:
            raise ValueError(
                f"data.{key}={column!r} is not a column of the {split} split of {describe(cfg)}; its columns are "
                f"{rows.column_names}: set data.{key} to the right one"
            )


# -- classify -------------------------------------------------------------------------------------
def label_vocabulary(train: "datasets.Dataset", cfg: DataConfig, task: TaskConfig) -> tuple[list[str], dict | None]:
    """(label names, string -> id mapping or None when labels are already ids)."""
    import datasets

    feature = train.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    values = train[cfg.label_column]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        return names, {name: i for i, name in enumerate(names)}
    if all(isinstance(v, (int, bool)) for v in values):
        n = task.num_labels or max(int(v) for v in values) + 1
        return [str(i) for i in range(n)], None
    odd = next(v for v in values if not isinstance(v, (str, int, bool)))
    raise ValueError(f"data.label_column={cfg.label_column!r} holds {odd!r} ({type(odd).__name__}); labels must be "
                     "integer class ids or strings")


def classify_features(rows: "datasets.Dataset", tokenizer: Tokenizer, cfg: DataConfig, task: TaskConfig, seq_len: int,
                      label_names: list[str], mapping: dict | None, split: str) -> Features:
    """Items: "ids", "label" (class id)."""
    require_columns(rows, {"text_column": cfg.text_column, "label_column": cfg.label_column,
                           "text_pair_column": cfg.text_pair_column}, cfg, split)
    sp = Specials.of(tokenizer, "classify")
    n_labels = len(label_names)
    texts = tokenizer.encode_batch([str(t) for t in rows[cfg.text_column]])
    pairs = tokenizer.encode_batch([str(t) for t in rows[cfg.text_pair_column]]) if cfg.text_pair_column else None
    items = []
    for row, (ids, raw_label) in enumerate(zip(texts, rows[cfg.label_column])):
        if mapping is not None:
            if raw_label not in mapping:
                raise ValueError(f"label {raw_label!r} of {split} row {row} does not occur in the train split, whose "
                                 f"labels are {list(mapping)}; fix the data or add train examples of it")
            label = mapping[raw_label]
        else:
            label = int(raw_label)
        if not 0 <= label < n_labels:
            raise ValueError(
                f"label {raw_label!r} of {split} row {row} is out of range for {n_labels} classes (ids 0..{n_labels - 1}); "
                f"fix the data or set task.num_labels (now {task.num_labels})"
            )
        items.append({"ids": classify_ids(ids, pairs[row] if pairs else None, sp, seq_len), "label": label})
    return Features(items, len(items), label_names=label_names)


def classify_ids(text: list[int], pair: list[int] | None, sp: Specials, seq_len: int) -> list[int]:
    """<|bos|> text [<|sep|> pair], cut to seq_len tokens. No eos at the end: a decoder pools its
    last token, and a causal LM's state at eos is about the next document, not this text."""
    if pair is None:
        return [sp.bos, *text[: seq_len - 1]]
    first, second = truncate_pair(text, pair, seq_len - 2)
    return [sp.bos, *first, sp.sep, *second]


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut the longer of two sequences first until both fit `budget` tokens together."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return a, b


# -- qa -------------------------------------------------------------------------------------------
def qa_features(rows: "datasets.Dataset", tokenizer: Tokenizer, cfg: DataConfig, task: TaskConfig, seq_len: int,
                split: str) -> Features:
    """One feature per window of each context. Items: "ids", "start"/"end" (answer token positions
    in the window, 0 = the answer is not inside it), "example" (row), "offsets" ((start, end)
    characters of the context for each id, None outside the context)."""
    require_columns(rows, {"question_column": cfg.question_column, "context_column": cfg.context_column,
                           "answers_column": cfg.answers_column, "id_column": cfg.id_column}, cfg, split)
    sp = Specials.of(tokenizer, "qa")
    names = rows[cfg.id_column] if cfg.id_column else list(range(len(rows)))
    questions = tokenizer.encode_batch([str(q) for q in rows[cfg.question_column]])
    items, references = [], []
    for row, (question, context, answers) in enumerate(zip(questions, rows[cfg.context_column], rows[cfg.answers_column])):
        spans = answer_spans(answers, context, cfg, f"{split} example {names[row]!r}")
        references.append((context, [context[s:e] for s, e in spans]))
        for window in qa_windows(question, context, tokenizer, sp, task, seq_len, answer=spans[0] if spans else None):
            items.append({**window, "example": row})
    return Features(items, len(rows), references=references)


def qa_windows(question: list[int], context: str, tokenizer: Tokenizer, sp: Specials, task: TaskConfig, seq_len: int,
               answer: tuple[int, int] | None = None) -> list[dict]:
    """<|bos|> question <|sep|> context window <|endoftext|> for each window of the context, with
    "offsets" (character span per id, None outside the context) and, when the answer's character
    span is given, "start"/"end": its token positions, or 0 where the window does not hold it."""
    question = question[: task.max_question_tokens]
    width = seq_len - len(question) - 3  # bos, sep, eos
    if width <= task.doc_stride:
        raise ValueError(
            f"trainer.seq_len={seq_len} leaves {width} context tokens per window after a {len(question)}-token "
            f"question, not more than task.doc_stride={task.doc_stride}; raise trainer.seq_len or lower "
            "task.doc_stride / task.max_question_tokens"
        )
    ctx_ids, ctx_offsets = tokenizer.encode_with_offsets(context)
    first_ctx = len(question) + 2
    tokens = char_span_to_tokens(answer, ctx_offsets) if answer else None
    windows = []
    for begin in window_starts(len(ctx_ids), width, task.doc_stride):
        chunk = slice(begin, begin + width)
        inside = tokens is not None and begin <= tokens[0] and tokens[1] < begin + width
        start, end = (tokens[0] - begin + first_ctx, tokens[1] - begin + first_ctx) if inside else (0, 0)
        windows.append({"ids": [sp.bos, *question, sp.sep, *ctx_ids[chunk], sp.eos], "start": start, "end": end,
                        "offsets": [None] * first_ctx + list(ctx_offsets[chunk]) + [None]})
    return windows


def answer_spans(answers: Any, context: str, cfg: DataConfig, where: str) -> list[tuple[int, int]]:
    """Character spans of the answers, each checked against the context."""
    if not (isinstance(answers, dict) and "text" in answers and "answer_start" in answers):
        raise ValueError(f"data.answers_column={cfg.answers_column!r} of {where} holds {answers!r}; SQuAD format is "
                         '{"text": [answer, ...], "answer_start": [character offset, ...]}')
    spans = []
    for text, start in zip(answers["text"], answers["answer_start"]):
        found = context[start : start + len(text)]
        if found != text:
            raise ValueError(
                f"the answer {text!r} of {where} is not in its context at answer_start={start} (the context there reads "
                f"{found!r}); fix answer_start (a character offset into the context) or drop the example"
            )
        spans.append((start, start + len(text)))
    return spans


def window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Token offsets of the windows covering n_tokens, consecutive windows overlapping by `stride`."""
    starts = [0]
    while starts[-1] + window < n_tokens:
        starts.append(starts[-1] + window - stride)
    return starts


def char_span_to_tokens(span: tuple[int, int], offsets: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(first, last) token positions covering a character span; None if no token does."""
    first = next((i for i in range(len(offsets)) if offsets[i][1] > span[0]), None)
    last = next((i for i in reversed(range(len(offsets))) if offsets[i][0] < span[1]), None)
    return None if first is None or last is None or last < first else (first, last)


# -- translate ------------------------------------------------------------------------------------
def translation_pairs(rows: "datasets.Dataset", cfg: DataConfig, split: str) -> tuple[list[str], list[str]]:
    if cfg.translation_column:
        require_columns(rows, {"translation_column": cfg.translation_column}, cfg, split)
        sources, targets = [], []
        for row, pair in enumerate(rows[cfg.translation_column]):
            missing = [lang for lang in (cfg.source_lang, cfg.target_lang) if not isinstance(pair, dict) or lang not in pair]
            if missing:
                raise ValueError(f"{split} row {row} of data.translation_column={cfg.translation_column!r} has no "
                                 f"{missing[0]!r} side (it holds {pair!r}); set data.source_lang / data.target_lang")
            sources.append(str(pair[cfg.source_lang]))
            targets.append(str(pair[cfg.target_lang]))
        return sources, targets
    require_columns(rows, {"source_column": cfg.source_column, "target_column": cfg.target_column}, cfg, split)
    return [str(s) for s in rows[cfg.source_column]], [str(t) for t in rows[cfg.target_column]]


def source_budget(task: TaskConfig, seq_len: int) -> int:
    return task.max_source_tokens or seq_len // 2


def translation_prompt(source_ids: list[int], sp: Specials, budget: int) -> list[int]:
    return [sp.bos, *source_ids[:budget], sp.sep]


def translate_features(rows: "datasets.Dataset", tokenizer: Tokenizer, cfg: DataConfig, task: TaskConfig, seq_len: int,
                       split: str) -> Features:
    """Items: "ids" (prompt + target + eos, at most seq_len + 1), "prompt_len"."""
    sp = Specials.of(tokenizer, "translate")
    sources, targets = translation_pairs(rows, cfg, split)
    budget = source_budget(task, seq_len)
    if budget >= seq_len - 1:
        raise ValueError(f"task.max_source_tokens={task.max_source_tokens} leaves no room for a target in "
                         f"trainer.seq_len={seq_len}; lower it (null = half of seq_len)")
    items = []
    for src, tgt in zip(tokenizer.encode_batch(sources), tokenizer.encode_batch(targets)):
        prompt = translation_prompt(src, sp, budget)
        items.append({"ids": [*prompt, *tgt, sp.eos][: seq_len + 1], "prompt_len": len(prompt)})
    return Features(items, len(items), references=targets)


# -- batches --------------------------------------------------------------------------------------
def pad_ids(rows: list[list[int]], pad: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, T) with T the longest row rounded up to `multiple`."""
    longest = max(len(r) for r in rows)
    width = math.ceil(longest / multiple) * multiple
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


class Collate:
    """Items -> a batch dict of tensors. "valid" is False for the filler items that even out
    validation shards across ranks; they are scored as nothing."""

    def __init__(self, kind: TaskKind, pad: int) -> None:
        self.kind, self.pad = kind, pad

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        valid = torch.tensor([not item.get("filler", False) for item in items])
        index = torch.tensor([item.get("index", -1) for item in items])
        if self.kind is TaskKind.translate:
            ids, mask = pad_ids([item["ids"] for item in items], self.pad)
            labels = ids[:, 1:].clone()
            for i, item in enumerate(items):  # predict target tokens and eos only
                labels[i, : item["prompt_len"] - 1] = IGNORE
            labels[~mask[:, 1:]] = IGNORE
            return {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "labels": labels, "valid": valid,
                    "index": index}
        ids, mask = pad_ids([item["ids"] for item in items], self.pad)
        batch = {"input_ids": ids, "attention_mask": mask, "valid": valid, "index": index}
        if self.kind is TaskKind.classify:
            batch["labels"] = torch.tensor([item["label"] for item in items])
        else:
            batch["start"] = torch.tensor([item["start"] for item in items])
            batch["end"] = torch.tensor([item["end"] for item in items])
        return batch


def build_features(kind: TaskKind, train_rows, val_rows, tokenizer: Tokenizer, cfg: DataConfig, task: TaskConfig,
                   seq_len: int) -> tuple[Features, Features]:
    match kind:
        case TaskKind.classify:
            require_columns(train_rows, {"label_column": cfg.label_column}, cfg, "train")
            names, mapping = label_vocabulary(train_rows, cfg, task)
            if task.num_labels is not None and task.num_labels < len(names):
                raise ValueError(f"task.num_labels={task.num_labels} but the train split has {len(names)} labels "
                                 f"{names[:10]}; raise task.num_labels or set it to null")
            if task.num_labels is not None:
                names = names + [str(i) for i in range(len(names), task.num_labels)]
            return (classify_features(train_rows, tokenizer, cfg, task, seq_len, names, mapping, "train"),
                    classify_features(val_rows, tokenizer, cfg, task, seq_len, names, mapping, "val"))
        case TaskKind.qa:
            return (qa_features(train_rows, tokenizer, cfg, task, seq_len, "train"),
                    qa_features(val_rows, tokenizer, cfg, task, seq_len, "val"))
        case TaskKind.translate:
            return (translate_features(train_rows, tokenizer, cfg, task, seq_len, "train"),
                    translate_features(val_rows, tokenizer, cfg, task, seq_len, "val"))
    raise ValueError(f"task.kind={kind.name} does not train on labelled examples")


__all__ = ["DEFAULT_EOS_TOKEN", "Collate", "Features", "Specials", "build_features", "load_splits", "IGNORE"]
