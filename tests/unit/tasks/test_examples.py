"""Labelled examples to features: sequences and labels as documented, QA windows that keep the
answer recoverable, and the errors a user sees for bad data."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain.data.config import DataConfig
from lmtrain.data.examples import IGNORE, Collate, build_features, load_splits, window_starts
from lmtrain.data.sampler import ExampleStream, val_shard
from lmtrain.data.tokenizers import ByteTokenizer
from lmtrain.tasks.config import TaskConfig, TaskKind

TOK = ByteTokenizer()
SP = TOK.special_token_ids()
BOS, SEP, EOS, PAD = SP["<|bos|>"], SP["<|sep|>"], SP["<|endoftext|>"], SP["<|pad|>"]


def files(tmp_path, train: list[dict], val: list[dict] | None = None, **data) -> DataConfig:
    for name, rows in (("train", train), ("val", val)):
        if rows is not None:
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataConfig(name="t", source="json", paths=[str(tmp_path / "train.jsonl")],
                      val_paths=[str(tmp_path / "val.jsonl")] if val is not None else [], **data)


def features(kind: str, cfg: DataConfig, seq_len: int = 64, **task):
    train, val = load_splits(cfg)
    return build_features(TaskKind[kind], train, val, TOK, cfg, TaskConfig(kind=kind, **task), seq_len)


def test_classify_sequences_and_string_labels(tmp_path):
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}]
    train, val = features("classify", files(tmp_path, rows, rows[:1]))
    assert train.label_names == ["neg", "pos"] and [i["label"] for i in train.items] == [1, 0]
    assert train.items[0]["ids"] == [BOS, *TOK.encode("good film")]
    long = [{"text": "x" * 100, "label": 0}, {"text": "y", "label": 1}]
    train, _ = features("classify", files(tmp_path, long, long), seq_len=32)
    assert train.items[0]["ids"] == [BOS, *TOK.encode("x" * 31)]


def test_classify_pairs_are_joined_by_the_separator(tmp_path):
    rows = [{"a": "one", "b": "two", "label": 0}, {"a": "three", "b": "four", "label": 1}]
    train, _ = features("classify", files(tmp_path, rows, rows, text_column="a", text_pair_column="b"))
    assert train.items[0]["ids"] == [BOS, *TOK.encode("one"), SEP, *TOK.encode("two")]


def test_classify_bad_data_errors(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    with pytest.raises(ValueError, match=r"data.label_column='sentiment' is not a column .* columns are \['text', 'label'\]"):
        features("classify", files(tmp_path, rows, rows, label_column="sentiment"))
    with pytest.raises(ValueError, match=r"label 7 of val row 0 is out of range for 2 classes"):
        features("classify", files(tmp_path, rows, [{"text": "c", "label": 7}]))
    with pytest.raises(ValueError, match=r"label -1 of train row 1 is out of range"):
        features("classify", files(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": -1}], rows))


def squad_row(context: str, answer: str, question: str = "which?", offset: int | None = None) -> dict:
    start = context.index(answer) if offset is None else offset
    return {"question": question, "context": context, "answers": {"text": [answer], "answer_start": [start]}}


def test_qa_windows_cover_the_answer_with_stride(tmp_path):
    context = " ".join(f"w{i:03d}" for i in range(60))  # 299 bytes: several windows at seq_len 64
    rows = [squad_row(context, "w042")]
    train, _ = features("qa", files(tmp_path, rows, rows), seq_len=64, doc_stride=16)
    assert len(train.items) == len(window_starts(len(context), 64 - len(TOK.encode("which?")) - 3, 16)) > 3
    holding = [i for i in train.items if i["start"]]
    assert holding, "some window holds the answer"
    for item in holding:  # the labelled span reads back as the answer through the offsets
        s, e = item["offsets"][item["start"]], item["offsets"][item["end"]]
        assert context[s[0] : e[1]] == "w042"
        assert item["ids"][item["start"]] == TOK.encode("w")[0]
    assert all(i["start"] == i["end"] == 0 for i in train.items if i not in holding)


def test_qa_answer_not_in_context_is_refused(tmp_path):
    bad = squad_row("the cat sat on the mat", "dog", offset=4)
    with pytest.raises(ValueError, match=r"the answer 'dog' of train example 0 is not in its context at answer_start=4 "
                                         r"\(the context there reads 'cat'\)"):
        features("qa", files(tmp_path, [bad], [bad]))


def test_translate_loss_covers_target_and_eos_only(tmp_path):
    rows = [{"source": "a b", "target": "x y z"}, {"source": "c", "target": "w"}]
    train, _ = features("translate", files(tmp_path, rows, rows))
    batch = Collate(TaskKind.translate, PAD)(train.items)
    first = [BOS, *TOK.encode("a b"), SEP, *TOK.encode("x y z"), EOS]
    assert train.items[0]["ids"] == first
    predicted = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert predicted == [*TOK.encode("x y z"), EOS]
    assert torch.equal(batch["input_ids"][0, : len(first) - 1], torch.tensor(first[:-1]))
    with pytest.raises(ValueError, match=r"data.source_column='source' is not a column"):
        features("translate", files(tmp_path, [{"de": "a", "en": "b"}] * 2, [{"de": "a", "en": "b"}]))


def test_translation_column_layout(tmp_path):
    rows = [{"translation": {"de": "haus", "en": "house"}}] * 2
    train, _ = features("translate", files(tmp_path, rows, rows, translation_column="translation"))
    assert train.references[0] == "house"
    with pytest.raises(ValueError, match=r"has no 'fr' side"):
        features("translate", files(tmp_path, rows, rows, translation_column="translation", target_lang="fr"))


def test_example_stream_is_disjoint_complete_and_resumable():
    items = [{"ids": [i], "label": 0} for i in range(24)]
    collate = Collate(TaskKind.classify, PAD)

    def take(rank, world, start, n):
        stream = iter(ExampleStream(items, collate, micro_batch_size=2, rank=rank, world_size=world, seed=3,
                                    start_sample=start))
        return [b["input_ids"][:, 0].tolist() for b in (next(stream) for _ in range(n))]

    ranks = [sum(take(r, 2, 0, 6), []) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == list(range(24))  # one epoch
    one = sum(take(0, 1, 0, 12), [])
    assert sum(take(0, 1, 8, 8), []) == one[8:]  # resumed at global sample 8


def test_val_shards_are_even_with_fillers():
    items = [{"ids": [i]} for i in range(5)]
    shards = [val_shard(items, r, 2) for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 3]
    real = sorted(x["index"] for s in shards for x in s if not x.get("filler"))
    assert real == list(range(5)) and sum(x.get("filler", False) for s in shards for x in s) == 1
