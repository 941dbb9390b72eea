"""prepare_dataset end to end on tiny local corpora: packing, split, caching, damage, errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers as hf_tokenizers
from tokenizers import models, pre_tokenizers

from lmtrain.data.config import DataConfig, SourceKind, TextUnit, TokenizerConfig, TokenizerKind
from lmtrain.data.prepare import (
    MissingPreparedDataError,
    compute_split,
    compute_token_dtype,
    load_prepared,
    prepare_dataset,
    prepared_dir,
)
from lmtrain.data.sources import python_stdlib_files
from lmtrain.data.tokenizers import load_tokenizer

BYTE = TokenizerConfig(kind=TokenizerKind.byte)
SMALL_BPE = TokenizerConfig(kind=TokenizerKind.bpe, vocab_size=320, min_frequency=2)


def _documents(n=40):
    """Distinct documents (the index is in each), some non-ASCII, one that spells the eos token."""
    docs = [f"doc {i}: naïve café — 日本語 🚀 " + "def f(x):\n    return x * %d\n" % i for i in range(n)]
    docs[7] = "a document that mentions <|endoftext|> in its text"
    return docs


def _jsonl(tmp_path, docs, name="corpus.jsonl", column="text"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def _data(tmp_path, path, **overrides):
    fields = dict(name="tiny", source=SourceKind.json, paths=[str(path)], val_fraction=0.1, num_proc=1,
                  cache_dir=str(tmp_path / "cache"))
    fields.update(overrides)
    return DataConfig(**fields)


def _split_at_eos(tokens, eos_id):
    """The documents of a packed token stream; checks it ends with eos."""
    assert tokens[-1] == eos_id
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


@pytest.mark.parametrize("tokenizer_cfg", [BYTE, SMALL_BPE], ids=["byte", "bpe"])
def test_every_document_is_packed_once_in_order_with_eos(tmp_path, tokenizer_cfg):
    docs = _documents()
    corpus = docs[:10] + ["", "   \n\t"] + docs[10:]  # blank documents are dropped
    out = prepare_dataset(_data(tmp_path, _jsonl(tmp_path, corpus)), tokenizer_cfg, log=lambda _: None)
    meta, train, val = load_prepared(out)
    train, val = np.asarray(train), np.asarray(val)
    tok = load_tokenizer(out)
    assert tok.fingerprint() == meta.tokenizer_hash and tok.eos_id == meta.eos_id

    train_pos, val_pos = compute_split(len(docs), 0.1, 1234)
    for tokens, positions, n_bytes in ((train, train_pos, meta.train_bytes), (val, val_pos, meta.val_bytes)):
        expected = [docs[i] for i in positions]
        assert _split_at_eos(np.asarray(tokens), meta.eos_id) == [tok.encode(d) for d in expected]
        assert n_bytes == sum(len(d.encode("utf-8")) for d in expected)
    assert (meta.n_train_docs, meta.n_val_docs) == (36, 4)
    assert (meta.n_train_tokens, meta.n_val_tokens) == (len(train), len(val))
    assert meta.max_token_id == max(train.max(), val.max()) < meta.vocab_size
    assert meta.dtype == "uint16" and train.dtype == np.uint16


def test_split_is_deterministic_disjoint_and_seeded():
    train, val = compute_split(1000, 0.05, seed=7)
    again_train, again_val = compute_split(1000, 0.05, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert len(val) == 50 and np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    assert np.all(np.diff(val) > 0)  # corpus order within a split
    assert not np.array_equal(compute_split(1000, 0.05, seed=8)[1], val)
    assert len(compute_split(3, 0.01, seed=0)[1]) == 1  # rounded up to a whole document
    assert not np.array_equal(val, np.arange(50))  # spread over the corpus, not its head


def test_output_is_deterministic_and_independent_of_num_proc(tmp_path):
    corpus = _jsonl(tmp_path, _documents(60))
    dirs = [
        prepare_dataset(_data(tmp_path, corpus, cache_dir=str(tmp_path / name), num_proc=num_proc), SMALL_BPE,
                        log=lambda _: None)
        for name, num_proc in (("a", 1), ("b", 1), ("c", 2))
    ]
    assert len({d.name for d in dirs}) == 1  # num_proc and cache_dir are not in the fingerprint
    for filename in ("train.bin", "val.bin", "tokenizer.json"):
        contents = {(d / filename).read_bytes() for d in dirs}
        assert len(contents) == 1, filename
    metas = [json.loads((d / "meta.json").read_text()) for d in dirs]
    for meta in metas:
        meta.pop("created")
    assert metas[0] == metas[1] == metas[2]


def test_second_prepare_is_a_no_op(tmp_path):
    data = _data(tmp_path, _jsonl(tmp_path, _documents()))
    out = prepare_dataset(data, BYTE, log=lambda _: None)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    assert prepare_dataset(data, BYTE, log=lines.append) == out
    assert any("already prepared (cached)" in line for line in lines)
    assert not any("tokenizing" in line for line in lines)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    forced = []
    prepare_dataset(data, BYTE, force=True, log=forced.append)
    assert any("force=True" in line for line in forced) and (out / "meta.json").stat().st_mtime_ns >= mtimes["meta.json"]


@pytest.mark.parametrize("damage", ["delete_meta", "truncate_train", "delete_val"])
def test_half_written_cache_is_refused_then_rebuilt(tmp_path, damage):
    data = _data(tmp_path, _jsonl(tmp_path, _documents()))
    out = prepare_dataset(data, BYTE, log=lambda _: None)
    good_train = (out / "train.bin").read_bytes()
    match damage:
        case "delete_meta":
            (out / "meta.json").unlink()
            reason = "meta.json is missing"
        case "truncate_train":
            with open(out / "train.bin", "r+b") as f:
                f.truncate(len(good_train) // 2)
            reason = f"train.bin holds {len(good_train) // 2} bytes"
        case "delete_val":
            (out / "val.bin").unlink()
            reason = "val.bin is missing"
    with pytest.raises(ValueError, match=f"{reason}.*run `lmtrain prepare` with the same data"):
        load_prepared(out)
    lines = []
    assert prepare_dataset(data, BYTE, log=lines.append) == out
    assert any("incomplete" in line and reason in line for line in lines), lines
    assert (out / "train.bin").read_bytes() == good_train
    load_prepared(out)


def test_stale_tmp_dirs_of_dead_processes_are_removed(tmp_path):
    data = _data(tmp_path, _jsonl(tmp_path, _documents()))
    target = prepared_dir(data, BYTE)
    target.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = target.with_name(f"{target.name}.tmp-{dead.pid}-abcd1234")
    live = target.with_name(f"{target.name}.tmp-{os.getppid()}-abcd1234")  # a running process
    for tmp in (stale, live):
        (tmp / "scratch").mkdir(parents=True)
        (tmp / "train.bin").write_bytes(b"\0\0")
    lines = []
    prepare_dataset(data, BYTE, log=lines.append)
    assert not stale.exists() and live.exists()
    assert any(str(stale) in line and "no longer runs" in line for line in lines)
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, live.name])


def test_token_dtype_grows_past_65536_ids():
    assert compute_token_dtype(262) == "uint16"
    assert compute_token_dtype(65536) == "uint16"
    assert compute_token_dtype(65537) == "uint32"
    with pytest.raises(ValueError, match="vocab_size=0"):
        compute_token_dtype(0)


def test_large_pretrained_vocab_is_written_as_uint32(tmp_path):
    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    hf = hf_tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.save(str(tmp_path / "tokenizer.json"))
    docs = [f"w{i} w{69_999 - i} w{i * 7}" for i in range(20)]
    tok_cfg = TokenizerConfig(kind=TokenizerKind.pretrained, path=str(tmp_path / "tokenizer.json"), eos_token="</s>")
    meta, train, val = load_prepared(prepare_dataset(_data(tmp_path, _jsonl(tmp_path, docs)), tok_cfg, log=lambda _: None))
    train, val = np.asarray(train), np.asarray(val)
    assert meta.dtype == "uint32" and train.dtype == np.uint32 and meta.vocab_size == 70_002
    everything = np.concatenate([train, val])
    assert 70_001 in everything  # w69999, beyond uint16
    assert meta.eos_id == 1 and meta.tokenizer_kind == "pretrained"


def test_fingerprint_follows_the_inputs_but_not_num_proc(tmp_path):
    path = _jsonl(tmp_path, _documents())
    base = prepared_dir(_data(tmp_path, path), BYTE)
    assert not base.parent.exists()  # computing the name does no work
    assert base.name.startswith("tiny-") and len(base.name) == len("tiny-") + 12
    assert prepared_dir(_data(tmp_path, path, num_proc=2), BYTE) == base
    assert prepared_dir(_data(tmp_path, path, val_fraction=0.2), BYTE) != base
    assert prepared_dir(_data(tmp_path, path), SMALL_BPE) != base
    path.write_text(path.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert prepared_dir(_data(tmp_path, path), BYTE) != base


def test_text_units_split_files_into_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nline two\n\nsecond para\n\n\nthird\n")
    (tmp_path / "b.txt").write_text("other file\n")
    counts = {}
    for unit in TextUnit:
        data = _data(tmp_path, tmp_path / "*.txt", source=SourceKind.text, text_unit=unit, val_fraction=0.3)
        meta = load_prepared(prepare_dataset(data, BYTE, log=lambda _: None)).meta
        counts[unit.name] = meta.n_train_docs + meta.n_val_docs
    assert counts == {"document": 2, "paragraph": 4, "line": 5}


def test_python_stdlib_source(tmp_path):
    files = python_stdlib_files()
    assert len(files) > 300
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(p.parts) for p in files)
    data = DataConfig(max_documents=20, num_proc=1, cache_dir=str(tmp_path))
    meta = load_prepared(prepare_dataset(data, BYTE, log=lambda _: None)).meta
    assert meta.n_train_docs + meta.n_val_docs == 20 and meta.n_val_docs == 1
    assert meta.train_bytes + meta.val_bytes == meta.n_train_tokens + meta.n_val_tokens - 20  # bytes + eos


# ---- errors name the bad value -------------------------------------------------------------


def test_empty_corpus_is_refused(tmp_path):
    data = _data(tmp_path, _jsonl(tmp_path, ["", "  ", "\n"]))
    with pytest.raises(ValueError, match=r"no non-empty document \(3 read, all empty\)"):
        prepare_dataset(data, BYTE, log=lambda _: None)
    assert not any(p.name.startswith("tiny-") for p in (tmp_path / "cache").iterdir())  # nothing left


def test_empty_split_suggests_more_documents(tmp_path):
    (tmp_path / "one.txt").write_text("just one document\n\nwith two paragraphs\n")
    data = _data(tmp_path, tmp_path / "one.txt", source=SourceKind.text, text_unit=TextUnit.document)
    with pytest.raises(ValueError, match=r"train split is empty: 1 document\(s\) .*data.text_unit=paragraph"):
        prepare_dataset(data, BYTE, log=lambda _: None)


def test_missing_text_column_lists_the_columns(tmp_path):
    data = _data(tmp_path, _jsonl(tmp_path, _documents(), column="content"))
    with pytest.raises(ValueError, match=r"data.text_column='text' is not a column .*\['content', 'id'\]"):
        prepare_dataset(data, BYTE, log=lambda _: None)


def test_paths_that_match_nothing_are_named(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ValueError, match=re.escape(f"data.paths entry '{pattern}' matches no file")):
        prepared_dir(_data(tmp_path, pattern, source=SourceKind.text), BYTE)
    missing = str(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"data.paths entry '{missing}' does not exist")):
        prepare_dataset(_data(tmp_path, missing), BYTE, log=lambda _: None)


def test_missing_pretrained_tokenizer_is_named(tmp_path):
    data = _data(tmp_path, _jsonl(tmp_path, _documents()))
    tok_cfg = TokenizerConfig(kind=TokenizerKind.pretrained, path=str(tmp_path / "no_tokenizer"))
    with pytest.raises(ValueError, match=re.escape(f"tokenizer.path '{tmp_path / 'no_tokenizer'}'")):
        prepare_dataset(data, tok_cfg, log=lambda _: None)


def test_load_prepared_of_a_missing_dir_says_to_prepare(tmp_path):
    # data=<name> is suggested only where a data preset of that name exists
    with pytest.raises(MissingPreparedDataError, match=r"run `lmtrain prepare data=wikitext103 "):
        load_prepared(tmp_path / "wikitext103-0123456789ab")
    with pytest.raises(MissingPreparedDataError, match=r"run `lmtrain prepare` with the same data") as raised:
        load_prepared(tmp_path / "wiki-0123456789ab")
    assert "data=wiki " not in str(raised.value)
    with pytest.raises(FileNotFoundError):
        load_prepared(Path(tmp_path / "wiki-0123456789ab"))


def test_parquet_and_hub_sources_rename_the_text_column(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep ~/.cache clean
    docs = _documents(20)
    (tmp_path / "local_hub").mkdir()
    pq.write_table(pa.table({"body": docs, "n": list(range(20))}), tmp_path / "local_hub" / "train.parquet")
    parquet = _data(tmp_path, tmp_path / "local_hub" / "train.parquet", source=SourceKind.parquet, text_column="body")
    # A hub name may be a local dataset directory: this runs the hub code path offline.
    hub = _data(tmp_path, "unused", source=SourceKind.hub, paths=[], hub_name=str(tmp_path / "local_hub"),
                text_column="body")
    outputs = [load_prepared(prepare_dataset(data, BYTE, log=lambda _: None)) for data in (parquet, hub)]
    for meta, train, val in outputs:
        assert meta.n_train_docs + meta.n_val_docs == 20
        assert meta.train_bytes + meta.val_bytes == sum(len(d.encode()) for d in docs)
    assert np.array_equal(outputs[0].train, outputs[1].train)


def test_unreachable_hub_dataset_is_named(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail fast, deterministically
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    data = _data(tmp_path, "unused", source=SourceKind.hub, hub_name="nobody/no-such-dataset", hub_config="x")
    with pytest.raises(ValueError, match="could not load data.hub_name='nobody/no-such-dataset' data.hub_config='x'"):
        prepare_dataset(data, BYTE, log=lambda _: None)
