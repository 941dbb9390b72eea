"""The word-level tokenizer (tokenizer=word) and LM prepare with explicit validation files:
ids, <unk>, save/load, transformers, config errors, val_paths, blank lines kept as eos."""

import json
import pickle
import re

import numpy as np
import pytest

from lmtrain.data.config import DataConfig, SourceKind, TextUnit, TokenizerConfig, TokenizerKind
from lmtrain.data.prepare import compute_fingerprint, load_prepared, prepare_dataset, prepared_dir
from lmtrain.data.tokenizers import (
    EXTRA_SPECIAL_TOKENS,
    WORD_UNK_TOKEN,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_word_tokenizer,
)

# Counts: the 6, cat 4, sat 3, on 3, mat 2, <unk> 2 (WikiText's own), dog 1, zebra 1.
CORPUS = [
    "the cat sat on the mat",
    "the cat sat on the <unk>",
    "the dog sat on the mat",
    "the cat and the cat <unk>",
]
N_SPECIALS = 1 + len(EXTRA_SPECIAL_TOKENS) + 1  # eos, the reserved specials, <unk>


@pytest.fixture(scope="module")
def words():
    return train_word_tokenizer(CORPUS, vocab_size=100, min_frequency=2)


def test_specials_come_first_then_words_by_count(words):
    ids = {name: words._hf.token_to_id(name) for name in ("<|endoftext|>", *EXTRA_SPECIAL_TOKENS, WORD_UNK_TOKEN)}
    assert list(ids.values()) == list(range(N_SPECIALS))
    assert words.eos_id == 0 and words.unk_id == N_SPECIALS - 1 and words.unk_token == "<unk>"
    # the 6, cat 4, then on and sat (3 each: code-point order), then mat 2; dog, and (1) are below min_frequency.
    assert [words.decode([i]) for i in range(N_SPECIALS, words.vocab_size)] == ["the", "cat", "on", "sat", "mat"]
    assert words.vocab_size == N_SPECIALS + 5


def test_known_words_round_trip_exactly(words):
    text = "the cat sat on the mat"
    ids = words.encode(text)
    assert len(ids) == 6 and WORD_UNK_TOKEN not in words.decode(ids)
    assert words.decode(ids) == text
    assert words.decode(words.encode("  the\tcat\n\nsat  ")) == "the cat sat"  # whitespace only separates
    assert words.decode([*ids, words.eos_id]) == text + " <|endoftext|>"
    assert words.encode_batch([text, "mat"]) == [ids, [words.encode("mat")[0]]]


def test_unknown_and_rare_words_and_wikitexts_unk_are_one_id(words):
    unk = words.unk_id
    # zebra was never seen, dog and "and" are under min_frequency, <unk> is WikiText's own rare word.
    assert words.encode("the zebra dog and <unk> cat") == [words.encode("the")[0], unk, unk, unk, unk,
                                                          words.encode("cat")[0]]
    assert words.decode(words.encode("a zebra")) == "<unk> <unk>"
    ids, offsets = words.encode_with_offsets("the zebra")
    assert ids[1] == unk and offsets == [(0, 3), (4, 9)]


def test_words_beyond_vocab_size_are_unk():
    small = train_word_tokenizer(CORPUS, vocab_size=N_SPECIALS + 2, min_frequency=1)
    assert small.vocab_size == N_SPECIALS + 2
    the, cat = small.encode("the cat")
    assert (the, cat) == (N_SPECIALS, N_SPECIALS + 1)  # the two most frequent words
    assert small.encode("sat on mat dog") == [small.unk_id] * 4


def test_a_word_spelled_like_a_special_token_is_unknown_not_eos(words):
    ids = words.encode("the <|endoftext|> <|pad|> cat")
    assert words.eos_id not in ids and ids[1:3] == [words.unk_id, words.unk_id]
    spelled = train_word_tokenizer(["<|endoftext|> <|endoftext|> the"], vocab_size=100, min_frequency=1)
    assert spelled.vocab_size == N_SPECIALS + 1  # counted as text, it takes no second id
    assert spelled.encode("<|endoftext|>") == [spelled.unk_id]


def test_save_load_round_trips_the_fingerprint(tmp_path, words):
    path = words.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, WordTokenizer)
    assert loaded.fingerprint() == words.fingerprint()
    assert path.read_text(encoding="utf-8") == words.to_json()
    text = "the zebra sat on <unk> mat"
    assert loaded.encode(text) == words.encode(text) and loaded.unk_id == words.unk_id
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["unk_token"] == "<unk>" and config["eos_token"] == "<|endoftext|>"
    assert pickle.loads(pickle.dumps(words)).encode("the <|endoftext|> cat") == words.encode("the <|endoftext|> cat")


def test_saved_word_tokenizer_loads_in_transformers_with_the_same_ids(tmp_path, words):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = words.save(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in ("the cat sat on the mat", "the zebra sat on <unk>", "dog   cat"):
        assert fast.encode(text, add_special_tokens=False) == words.encode(text)
    assert fast.decode(words.encode("the cat sat"), clean_up_tokenization_spaces=False) == "the cat sat"
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.unk_token == "<unk>" and auto.unk_token_id == words.unk_id and auto.eos_token_id == words.eos_id


def test_build_tokenizer_trains_words_from_the_config():
    cfg = TokenizerConfig(kind=TokenizerKind.word, vocab_size=N_SPECIALS + 1, min_frequency=1)
    tok = build_tokenizer(cfg, iter([CORPUS]))
    assert isinstance(tok, WordTokenizer) and tok.encode("the cat") == [N_SPECIALS, tok.unk_id]
    with pytest.raises(ValueError, match="tokenizer.kind=word needs training texts"):
        build_tokenizer(cfg)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"vocab_size": 7}, "tokenizer.vocab_size=7 leaves no room for a word"),
        ({"vocab_size": 0}, "tokenizer.vocab_size=0 leaves no room for a word"),
        ({"eos_token": "<unk>"}, "tokenizer.eos_token='<unk>' is the unknown-word token"),
        ({"min_frequency": 0}, "tokenizer.min_frequency=0"),
        ({"kind": "words"}, "tokenizer.kind='words' is not a valid choice; use one of: byte, bpe, pretrained, word"),
    ],
)
def test_word_config_rejects_bad_values_by_name(kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        TokenizerConfig(**{"kind": TokenizerKind.word, **kwargs})


def test_reserved_eos_token_is_refused_by_name():
    with pytest.raises(ValueError, match=re.escape("tokenizer.eos_token='<|pad|>' is one of the reserved specials")):
        train_word_tokenizer(CORPUS, vocab_size=100, min_frequency=1, eos_token="<|pad|>")
    TokenizerConfig(kind=TokenizerKind.word, vocab_size=8)  # the smallest that holds a word


# -- LM prepare with explicit validation files -------------------------------------------------------
TRAIN_LINES = ["the cat sat on the mat", " ", "the dog sat on the cat", "", "a cat and a dog"]
VAL_LINES = ["the zebra sat", " ", "on the mat"]


def _text_data(tmp_path, **overrides):
    (tmp_path / "train.txt").write_text("\n".join(TRAIN_LINES) + "\n", encoding="utf-8")
    (tmp_path / "val.txt").write_text("\n".join(VAL_LINES) + "\n", encoding="utf-8")
    fields = dict(name="words", source=SourceKind.text, paths=[str(tmp_path / "train.txt")],
                  val_paths=[str(tmp_path / "val.txt")], text_unit=TextUnit.line, num_proc=1,
                  cache_dir=str(tmp_path / "cache"))
    fields.update(overrides)
    return DataConfig(**fields)


WORD_CFG = TokenizerConfig(kind=TokenizerKind.word, vocab_size=100, min_frequency=1)


def _documents(tokens, eos_id):
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [np.asarray(tokens)[s:e].tolist() for s, e in zip(starts, ends)]


def test_val_paths_are_the_val_split_whole_and_train_is_data_paths(tmp_path):
    out = prepare_dataset(_text_data(tmp_path), WORD_CFG, log=lambda _: None)
    meta, train, val = load_prepared(out)
    train, val = np.asarray(train), np.asarray(val)
    tok = load_tokenizer(out)
    nonblank_train = [line for line in TRAIN_LINES if line.strip()]
    nonblank_val = [line for line in VAL_LINES if line.strip()]
    assert _documents(train, meta.eos_id) == [tok.encode(line) for line in nonblank_train]
    assert _documents(val, meta.eos_id) == [tok.encode(line) for line in nonblank_val]
    assert (meta.n_train_docs, meta.n_val_docs) == (3, 2)
    assert tok.encode("zebra") == [tok.unk_id]  # the vocabulary comes from the train split only
    assert "val: text files" in meta.source and "val.txt" in meta.source


def test_keep_empty_documents_gives_one_eos_per_line(tmp_path):
    out = prepare_dataset(_text_data(tmp_path, keep_empty_documents=True), WORD_CFG, log=lambda _: None)
    meta, train, val = load_prepared(out)
    train, val = np.asarray(train), np.asarray(val)
    tok = load_tokenizer(out)
    # pytorch/examples word_language_model: line.split() + ['<eos>'] for every line, blank ones too.
    assert meta.n_train_tokens == sum(len(line.split()) + 1 for line in TRAIN_LINES)
    assert meta.n_val_tokens == sum(len(line.split()) + 1 for line in VAL_LINES)
    assert _documents(val, meta.eos_id) == [tok.encode(line) for line in VAL_LINES]
    assert meta.val_bytes == sum(len(line) for line in VAL_LINES if line.strip())


def test_val_sources_and_blank_lines_change_the_fingerprint(tmp_path):
    data = _text_data(tmp_path)
    held_out = DataConfig(**{**data.__dict__, "val_paths": []})
    (tmp_path / "other.txt").write_text("the mat\n", encoding="utf-8")
    other_val = DataConfig(**{**data.__dict__, "val_paths": [str(tmp_path / "other.txt")]})
    keep = DataConfig(**{**data.__dict__, "keep_empty_documents": True})
    dirs = {prepared_dir(d, WORD_CFG) for d in (data, held_out, other_val, keep)}
    assert len(dirs) == 4
    hub = DataConfig(name="w", source=SourceKind.hub, hub_name="Salesforce/wikitext", hub_config="wikitext-2-v1")
    assert compute_fingerprint(hub, WORD_CFG) != compute_fingerprint(
        DataConfig(**{**hub.__dict__, "hub_val_split": "validation"}), WORD_CFG)


def test_an_all_blank_val_file_is_refused_by_name(tmp_path):
    data = _text_data(tmp_path)
    (tmp_path / "val.txt").write_text(" \n\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"the corpus text files \[.*val\.txt'\].* has no non-empty document"):
        prepare_dataset(data, WORD_CFG, log=lambda _: None)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"source": SourceKind.hub, "hub_name": "x/y", "val_paths": ["v.txt"]},
         "data.val_paths=['v.txt'] names local files but data.source=hub"),
        ({"source": SourceKind.text, "paths": ["t.txt"], "hub_val_split": "validation"},
         "data.hub_val_split='validation' but data.source=text, not hub"),
    ],
)
def test_val_source_settings_that_do_not_fit_the_source_are_refused(kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        DataConfig(**kwargs)


def test_a_missing_val_path_is_named(tmp_path):
    data = _text_data(tmp_path, val_paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(ValueError, match=re.escape(f"data.val_paths entry '{tmp_path / 'nope.txt'}' does not exist")):
        prepare_dataset(data, WORD_CFG, log=lambda _: None)
