"""Tokenizers: round trips, special ids, the saved tokenizer.json in transformers, load errors."""

import json
import pickle

import pytest
import tokenizers as hf_tokenizers
from tokenizers import models, pre_tokenizers

from lmtrain.data.config import TokenizerConfig, TokenizerKind
from lmtrain.data.tokenizers import (
    EXTRA_SPECIAL_TOKENS,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

NON_ASCII = "naïve café — 日本語 🚀"
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    f"{NON_ASCII}\nUnicode text: Grüße, привет, مرحبا.\n",
    "for i in range(10):\n    print(i * i)\n",
] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CORPUS, vocab_size=400, min_frequency=2)


def test_byte_tokenizer_ids_are_utf8_bytes_and_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(NON_ASCII)
    assert ids == list(NON_ASCII.encode("utf-8"))
    assert tok.decode(ids) == NON_ASCII
    assert tok.encode_batch([NON_ASCII, "a"]) == [ids, [97]]


def test_byte_tokenizer_special_ids_are_documented_values():
    tok = ByteTokenizer()
    assert tok.eos_id == 256 and tok.vocab_size == 262
    assert tok.special_token_ids() == {
        "<|endoftext|>": 256, "<|pad|>": 257, "<|bos|>": 258, "<|mask|>": 259, "<|sep|>": 260, "<|unk|>": 261,
    }
    assert tok.decode([104, 105, 256, 33]) == "hi<|endoftext|>!"


def test_invalid_utf8_decodes_with_replacement():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 65, 0xE6, 0x97]) == "\ufffdA\ufffd"
    with pytest.raises(ValueError, match="token id 999"):
        tok.decode([999])


def test_bpe_round_trips_any_text_and_compresses(bpe):
    for text in (NON_ASCII, "unseen ŽŁÓĆ ☃ \x00\x7f\t tabs", CORPUS[0]):
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(CORPUS[1])) < len(CORPUS[1].encode()) / 2  # it learnt merges
    # A corpus this small runs out of pairs to merge before 400.
    assert bpe.eos_id == 0 and 262 < bpe.vocab_size <= 400
    assert list(bpe.special_token_ids()) == ["<|endoftext|>", *EXTRA_SPECIAL_TOKENS]
    assert list(bpe.special_token_ids().values()) == list(range(6))


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe_tokenizer(CORPUS, vocab_size=400, min_frequency=2)
    assert again.to_json() == bpe.to_json() and again.fingerprint() == bpe.fingerprint()


def test_special_token_text_inside_a_document_is_not_eos(bpe):
    for tok in (bpe, ByteTokenizer()):
        ids = tok.encode("a<|endoftext|>b")
        assert tok.eos_id not in ids
        assert tok.decode(ids) == "a<|endoftext|>b"


def test_pickled_hf_tokenizer_encodes_like_the_original(bpe):
    # datasets.map(num_proc>1) pickles the tokenizer into its workers.
    clone = pickle.loads(pickle.dumps(bpe))
    text = "x <|endoftext|> y " + NON_ASCII
    assert clone.encode(text) == bpe.encode(text)
    assert clone.fingerprint() == bpe.fingerprint()


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_saved_tokenizer_loads_in_transformers_and_encodes_identically(tmp_path, bpe, kind):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = bpe if kind == "bpe" else ByteTokenizer()
    path = tok.save(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in (NON_ASCII, CORPUS[0], CORPUS[2]):
        assert fast.encode(text, add_special_tokens=False) == tok.encode(text)
        assert fast.decode(tok.encode(text)) == text
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.eos_token_id == tok.eos_id and auto.pad_token_id == tok.special_token_ids()["<|pad|>"]


def test_load_tokenizer_restores_the_same_tokenizer(tmp_path, bpe):
    byte_dir, bpe_dir = tmp_path / "byte", tmp_path / "bpe"
    ByteTokenizer().save(byte_dir)
    bpe.save(bpe_dir)
    loaded_byte = load_tokenizer(byte_dir)
    assert isinstance(loaded_byte, ByteTokenizer)  # recognised: the fast Python path
    assert loaded_byte.fingerprint() == ByteTokenizer().fingerprint()
    loaded_bpe = load_tokenizer(bpe_dir / "tokenizer.json")
    assert isinstance(loaded_bpe, HFTokenizer)
    assert loaded_bpe.encode(NON_ASCII) == bpe.encode(NON_ASCII)
    assert loaded_bpe.fingerprint() == bpe.fingerprint()


def test_fingerprint_is_the_sha256_of_the_saved_file(tmp_path, bpe):
    import hashlib

    path = bpe.save(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == bpe.fingerprint()
    assert ByteTokenizer().fingerprint() != bpe.fingerprint()


def _word_level_file(tmp_path, vocab):
    hf = hf_tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return path


def test_pretrained_tokenizer_loads_by_eos_name(tmp_path):
    path = _word_level_file(tmp_path, {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3})
    tok = build_tokenizer(TokenizerConfig(kind=TokenizerKind.pretrained, path=str(tmp_path), eos_token="</s>"))
    assert tok.eos_id == 1 and tok.vocab_size == 4
    assert tok.encode("hello world") == [2, 3]
    with pytest.raises(ValueError, match=r"tokenizer.eos_token='<\|endoftext\|>' is not in the vocabulary of"):
        build_tokenizer(TokenizerConfig(kind=TokenizerKind.pretrained, path=str(path)))


def test_pretrained_tokenizer_path_missing_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"tokenizer.path '{missing}' is not a tokenizer.json file"):
        build_tokenizer(TokenizerConfig(kind=TokenizerKind.pretrained, path=str(missing)))


def test_byte_file_edited_by_hand_is_not_mistaken_for_the_byte_tokenizer(tmp_path):
    path = ByteTokenizer().save(tmp_path)
    content = json.loads(path.read_text())
    content["model"]["vocab"]["A"], content["model"]["vocab"]["B"] = 66, 65  # swap two ids
    path.write_text(json.dumps(content))
    loaded = load_tokenizer(path)
    assert isinstance(loaded, HFTokenizer) and loaded.encode("AB") == [66, 65]


def test_a_bert_tokenizer_plays_lmtrain_roles_and_other_tokenizers_keep_theirs(tmp_path, bpe):
    """BERT's WordPiece specials take lmtrain's roles ([CLS] bos, [SEP] sep and eos, [PAD], [MASK],
    [UNK]), so encoder tasks build `[CLS] text [SEP]` as BERT was trained; the mapping survives
    pickling (datasets' workers) and saving, and lmtrain's own tokenizers are untouched."""
    from lmtrain_testing import write_bert_tokenizer

    from lmtrain.data.examples import Specials
    from lmtrain.data.tokenizers import special_id

    bert = load_tokenizer(write_bert_tokenizer(tmp_path / "bert"))
    assert (bert.eos_token, bert.eos_id, bert.unk_token) == ("[SEP]", 3, "[UNK]")
    assert bert.special_token_ids() == {"[SEP]": 3, "<|pad|>": 0, "<|bos|>": 2, "<|mask|>": 4, "<|sep|>": 3, "<|unk|>": 1}
    assert Specials.of(bert, "classify") == Specials(bos=2, sep=3, eos=3, pad=0)
    assert special_id(bert, "<|mask|>", "task=masked_lm") == 4
    assert bert.decode(bert.encode("The cat sees a zebra.")) == "the cat sees a [UNK]."
    again = pickle.loads(pickle.dumps(bert))
    assert (again.eos_token, again.special_token_ids(), again.unk_token) == ("[SEP]", bert.special_token_ids(), "[UNK]")
    bert.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert {k: saved[k] for k in ("eos_token", "cls_token", "sep_token", "pad_token", "mask_token", "unk_token")} == {
        "eos_token": "[SEP]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]",
        "unk_token": "[UNK]"}
    assert load_tokenizer(tmp_path / "saved").special_token_ids() == bert.special_token_ids()
    # a tokenizer with lmtrain's own names keeps them, and the byte tokenizer is as it was
    assert set(bpe.special_token_ids()) == {"<|endoftext|>", *EXTRA_SPECIAL_TOKENS}
    assert ByteTokenizer().special_token_ids()["<|bos|>"] == 258 and ByteTokenizer().special_token_text("<|bos|>") == "<|bos|>"
    # an eos a user names explicitly is still required to exist
    with pytest.raises(ValueError, match=r"tokenizer.eos_token='</s>' is not in the vocabulary"):
        load_tokenizer(tmp_path / "bert", eos_token="</s>")
