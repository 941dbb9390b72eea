"""Tokenizers: byte, byte-level BPE or words trained on the corpus, or a pretrained tokenizer.json.

Every tokenizer saves itself as a Hugging Face `tokenizer.json` (plus a `tokenizer_config.json`
naming the special tokens), so `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` and
`AutoTokenizer.from_pretrained(dir)` load what lmtrain trained on, the byte tokenizer included.

Special token ids:
- byte: byte b is id b (0..255); then `<|endoftext|>` (eos) 256, `<|pad|>` 257, `<|bos|>` 258,
  `<|mask|>` 259, `<|sep|>` 260, `<|unk|>` 261; vocab_size 262. unk is never produced; it is
  there so encoder tasks find the same names in every tokenizer.
- bpe: the specials come first: eos 0, pad 1, bos 2, mask 3, sep 4, unk 5; then the 256 byte
  symbols, then merges, up to vocab_size.
- word: eos 0, pad 1, bos 2, mask 3, sep 4, `<|unk|>` 5 as for bpe, then `<unk>` 6, then the words
  of the train split, most frequent first (ties in code-point order), up to vocab_size. A word
  outside the vocabulary becomes `<unk>` (6), the token WikiText and PTB already use for rare
  words, so theirs and lmtrain's are one id; `<|unk|>` (5) stays reserved and is never produced.
  Words are split at whitespace only (the corpus is expected to be tokenized already, as WikiText
  is) and decode joined by single spaces.
- pretrained: whatever the file says; eos is looked up by name, the extra specials when present.
  A BERT WordPiece tokenizer (none of lmtrain's names, all of [CLS] [SEP] [PAD] [MASK] [UNK]) has
  its specials play lmtrain's roles, see BERT_SPECIAL_TOKENS; its eos (document end) is [SEP].

Text is encoded as text: a document that contains the string `<|endoftext|>` does not produce
the eos id (HF tokenizers would otherwise match added tokens inside raw text); to the word
tokenizer such a word is unknown, `<unk>`.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import tokenizers as hf_tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from lmtrain.data.config import TokenizerConfig, TokenizerKind

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_EOS_TOKEN = "<|endoftext|>"
# The unknown word of tokenizer=word: the literal WikiText and PTB use, so their rare words and ours share an id.
WORD_UNK_TOKEN = "<unk>"
# Reserved now so encoder tasks (masked LM, classification, QA) find them in every tokenizer.
# Order matters: it fixes their ids (see the module docstring).
EXTRA_SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|mask|>", "<|sep|>", "<|unk|>")
# BERT's tokenizers name their specials their own way. These play lmtrain's roles, so the encoder tasks
# build BERT's own sequences: classify `[CLS] text [SEP] pair`, masked LM masks with [MASK]. BERT has
# no document end: [SEP] is its eos too (between documents, as in its pretraining data).
BERT_SPECIAL_TOKENS = {"<|pad|>": "[PAD]", "<|bos|>": "[CLS]", "<|mask|>": "[MASK]", "<|sep|>": "[SEP]", "<|unk|>": "[UNK]"}
BERT_EOS_TOKEN = "[SEP]"
# tokenizer_config.json keys that transformers reads, for the specials we know by name.
_TRANSFORMERS_SPECIAL_KEYS = {
    "<|pad|>": "pad_token",
    "<|bos|>": "bos_token",
    "<|mask|>": "mask_token",
    "<|sep|>": "sep_token",
    "<|unk|>": "unk_token",
}


class Tokenizer(ABC):
    """What prepare and training need of a tokenizer. Ids are plain ints in [0, vocab_size)."""

    vocab_size: int
    eos_id: int
    eos_token: str
    unk_token: Optional[str] = None
    """The token that text outside the vocabulary becomes (word: `<unk>`); None when nothing is unknown."""

    @abstractmethod
    def encode(self, text: str) -> List[int]: ...

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]: ...

    @abstractmethod
    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Ids and, for each, the (start, end) character span of `text` it came from (extractive QA
        maps predicted tokens back to the text through these)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens decode to their names; bytes that are not valid UTF-8 become U+FFFD."""

    @abstractmethod
    def to_json(self) -> str:
        """The Hugging Face tokenizer.json text; saved byte for byte."""

    @abstractmethod
    def special_token_ids(self) -> Dict[str, int]:
        """eos and those of EXTRA_SPECIAL_TOKENS this tokenizer has, by name."""

    def special_token_text(self, name: str) -> str:
        """The token that plays the role of lmtrain's special `name` (eos or one of EXTRA_SPECIAL_TOKENS)
        in this tokenizer: `name` itself, except in a BERT tokenizer (BERT_SPECIAL_TOKENS)."""
        return name

    def fingerprint(self) -> str:
        """sha256 hex of the serialized form: equals `sha256sum tokenizer.json` after `save`."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory`; returns tokenizer.json's path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        transformers_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token}
        for name in self.special_token_ids():
            if name in _TRANSFORMERS_SPECIAL_KEYS:
                text = self.special_token_text(name)
                # BERT's tokenizers call their start token cls_token (bos_token is unset there)
                key = "cls_token" if text == BERT_SPECIAL_TOKENS["<|bos|>"] else _TRANSFORMERS_SPECIAL_KEYS[name]
                transformers_config[key] = text
        if self.unk_token is not None:  # the one encoding produces wins over the reserved <|unk|>
            transformers_config["unk_token"] = self.unk_token
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(transformers_config, indent=2) + "\n")
        return path


def _bytes_to_symbols() -> List[str]:
    """The byte-level alphabet: byte b -> a printable unicode character (the GPT-2 convention).

    Printable Latin-1 bytes stand for themselves; the others are shifted past 255, so that
    every byte is a visible, non-whitespace character that BPE can merge.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: List[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _added_tokens(names: Iterable[str]) -> List[AddedToken]:
    return [AddedToken(name, special=True, normalized=False) for name in names]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids, with specials after them. Encodes in Python: ~100 MB/s here, ~60x the same mapping through HF."""

    def __init__(self, eos_token: str = DEFAULT_EOS_TOKEN, extra_special_tokens: Sequence[str] = EXTRA_SPECIAL_TOKENS):
        if eos_token in extra_special_tokens:
            raise ValueError(f"tokenizer.eos_token={eos_token!r} is one of the reserved specials {extra_special_tokens}")
        self.eos_token = eos_token
        self._specials = [eos_token, *extra_special_tokens]
        self._special_ids = {name: 256 + i for i, name in enumerate(self._specials)}
        self.eos_id = 256
        self.vocab_size = 256 + len(self._specials)

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        ids: List[int] = []
        offsets: List[Tuple[int, int]] = []
        for position, char in enumerate(text):
            encoded = char.encode("utf-8")
            ids.extend(encoded)
            offsets.extend([(position, position + 1)] * len(encoded))  # every byte of a character maps to it
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        pieces: List[str] = []
        pending = bytearray()
        for token_id in ids:
            if 0 <= token_id < 256:
                pending.append(token_id)
                continue
            if not 256 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            pieces.append(self._specials[token_id - 256])
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def to_json(self) -> str:
        # The same mapping as an HF byte-level BPE without merges, so transformers can load it.
        symbols = _bytes_to_symbols()
        hf = hf_tokenizers.Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
        # use_regex=False: one pre-token per text; nothing to split when there are no merges.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(_added_tokens(self._specials))
        return hf.to_str(pretty=True)

    def special_token_ids(self) -> Dict[str, int]:
        return dict(self._special_ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (trained BPE or a pretrained tokenizer.json)."""

    def __init__(self, hf: hf_tokenizers.Tokenizer, eos_token: str, origin: str = "the tokenizer"):
        self._roles = special_roles(hf)
        if self._roles == BERT_SPECIAL_TOKENS:
            self.unk_token = BERT_SPECIAL_TOKENS["<|unk|>"]  # what WordPiece makes of an unknown word
            if eos_token == DEFAULT_EOS_TOKEN and hf.token_to_id(eos_token) is None:
                eos_token = BERT_EOS_TOKEN  # the default asked of a BERT tokenizer, which has none
        eos_id = hf.token_to_id(eos_token)
        if eos_id is None:
            specials = [token.content for token in hf.get_added_tokens_decoder().values() if token.special]
            raise ValueError(
                f"tokenizer.eos_token={eos_token!r} is not in the vocabulary of {origin}; its special tokens are "
                f"{specials[:20]}; set tokenizer.eos_token to the one that ends a document"
            )
        self._hf = hf
        # A document containing e.g. "<|endoftext|>" must not end early: encode specials as text.
        self._hf.encode_special_tokens = True
        self.eos_token = eos_token
        self.eos_id = eos_id
        # Ids of a pretrained file need not be contiguous; an embedding must cover the largest.
        self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1

    # datasets.map(num_proc>1) pickles the tokenizer into its workers, and the HF pickle
    # drops encode_special_tokens: rebuild through __init__ so workers encode like the parent.
    def __getstate__(self) -> Dict[str, str]:
        return {"json": self.to_json(), "eos_token": self.eos_token}

    def __setstate__(self, state: Dict[str, str]) -> None:
        self.__init__(hf_tokenizers.Tokenizer.from_str(state["json"]), state["eos_token"])

    def encode(self, text: str) -> List[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # encode_batch_fast skips offsets, which lmtrain never uses.
        return [encoding.ids for encoding in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        encoding = self._hf.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._hf.to_str(pretty=True)

    def special_token_ids(self) -> Dict[str, int]:
        found = {self.eos_token: self.eos_id}
        for name, text in self._roles.items():
            found[name] = self._hf.token_to_id(text)
        return found

    def special_token_text(self, name: str) -> str:
        return self._roles.get(name, name)


def special_roles(hf: hf_tokenizers.Tokenizer) -> Dict[str, str]:
    """lmtrain's special name -> the token that plays it, for those this tokenizer has: lmtrain's own
    names, or BERT's when it has none of lmtrain's and every one of BERT's."""
    own = {name: name for name in EXTRA_SPECIAL_TOKENS if hf.token_to_id(name) is not None}
    if own:
        return own
    specials = {token.content for token in hf.get_added_tokens_decoder().values() if token.special}
    return dict(BERT_SPECIAL_TOKENS) if set(BERT_SPECIAL_TOKENS.values()) <= specials else {}


class WordTokenizer(HFTokenizer):
    """An HF WordLevel model over whitespace-split words: a word is one id, an unknown word `unk_token`."""

    def __init__(self, hf: hf_tokenizers.Tokenizer, eos_token: str, origin: str = "the tokenizer"):
        super().__init__(hf, eos_token, origin)
        unk_token = hf.model.unk_token
        unk_id = hf.token_to_id(unk_token) if unk_token else None
        if unk_id is None:
            raise ValueError(
                f"the word-level model of {origin} has unk_token={unk_token!r}, which is not in its vocabulary; an "
                "unknown word could not be encoded; train it again with tokenizer=word"
            )
        self.unk_token = unk_token
        self.unk_id = unk_id
        # The specials sit in the WordLevel vocabulary too, so a word spelled like one (a document that
        # says "<|endoftext|>") would get its id: such a word is unknown instead.
        self._spelled_specials = {
            token.content: token_id
            for token_id, token in hf.get_added_tokens_decoder().items()
            if token.special and token_id != unk_id
        }
        self._special_id_set = frozenset(self._spelled_specials.values())

    def _as_text(self, ids: List[int]) -> List[int]:
        if self._special_id_set.isdisjoint(ids):  # the common case, checked in C
            return ids
        return [self.unk_id if token_id in self._special_id_set else token_id for token_id in ids]

    def encode(self, text: str) -> List[int]:
        return self._as_text(super().encode(text))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._as_text(ids) for ids in super().encode_batch(texts)]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        ids, offsets = super().encode_with_offsets(text)
        return self._as_text(ids), offsets


def train_word_tokenizer(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int, eos_token: str = DEFAULT_EOS_TOKEN
) -> WordTokenizer:
    """Count the whitespace-separated words of `texts` and keep the most frequent that occur at
    least `min_frequency` times, specials first (see the module docstring); the rest are `<unk>`."""
    if eos_token in EXTRA_SPECIAL_TOKENS or eos_token == WORD_UNK_TOKEN:
        raise ValueError(
            f"tokenizer.eos_token={eos_token!r} is one of the reserved specials {(*EXTRA_SPECIAL_TOKENS, WORD_UNK_TOKEN)}"
        )
    specials = [eos_token, *EXTRA_SPECIAL_TOKENS, WORD_UNK_TOKEN]
    if vocab_size <= len(specials):
        raise ValueError(
            f"tokenizer.vocab_size={vocab_size} leaves no room for a word after the {len(specials)} special tokens "
            f"{specials}; use at least {len(specials) + 1}"
        )
    counter = hf_tokenizers.Tokenizer(models.WordLevel(unk_token=WORD_UNK_TOKEN))
    counter.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # The trainer ranks words by count, then code point. It is given no specials: with them it gives a
    # word that spells one (WikiText's `<unk>`) a second id and leaves a hole at the first. Asking for
    # vocab_size words leaves enough after the words that spell a special are taken out below.
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False)
    counter.train_from_iterator(texts, trainer=trainer)
    ranked = sorted(counter.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    words = [word for word, _ in ranked if word not in specials]
    vocab = {token: token_id for token_id, token in enumerate([*specials, *words][:vocab_size])}
    hf = hf_tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=WORD_UNK_TOKEN))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(_added_tokens(specials))  # already in the vocabulary: they keep their ids
    return WordTokenizer(hf, eos_token, origin="the trained word tokenizer")


def special_id(tokenizer: Tokenizer, name: str, purpose: str) -> int:
    """The id of special token `name` (eos or one of EXTRA_SPECIAL_TOKENS); a clear error when absent."""
    found = tokenizer.special_token_ids()
    if name not in found:
        raise ValueError(
            f"the tokenizer has no {name} token, which {purpose} needs (it has {sorted(found)}); prepare with "
            "tokenizer=byte or tokenizer=bpe (both reserve it), or use a pretrained tokenizer.json that defines it"
        )
    return found[name]


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int, min_frequency: int, eos_token: str = DEFAULT_EOS_TOKEN
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization): any text round-trips, no unknown tokens."""
    if eos_token in EXTRA_SPECIAL_TOKENS:
        raise ValueError(f"tokenizer.eos_token={eos_token!r} is one of the reserved specials {EXTRA_SPECIAL_TOKENS}")
    hf = hf_tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_added_tokens([eos_token, *EXTRA_SPECIAL_TOKENS]),
        # All 256 bytes, even those absent from the training text, so nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(hf, eos_token, origin="the trained BPE tokenizer")


def resolve_tokenizer_file(path: str | Path) -> Path:
    """A tokenizer.json file, or a directory holding one; raises with the path when neither exists."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / TOKENIZER_FILE
    if not candidate.is_file():
        raise ValueError(
            f"tokenizer.path '{path}' is not a tokenizer.json file nor a directory holding one "
            f"(looked for '{candidate}'); set tokenizer.path to an existing file"
        )
    return candidate


def _eos_token_from_config(tokenizer_file: Path) -> Optional[str]:
    config_path = tokenizer_file.parent / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        return None
    eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    # transformers writes either "<eos>" or {"content": "<eos>", ...}.
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(path: str | Path, eos_token: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer.json (file or directory). eos_token defaults to the one in a sibling
    tokenizer_config.json, else `<|endoftext|>`. A file in the byte tokenizer's exact layout
    comes back as a fast ByteTokenizer, a word-level one whose unk token is in its vocabulary
    as a WordTokenizer."""
    tokenizer_file = resolve_tokenizer_file(path)
    eos_token = eos_token or _eos_token_from_config(tokenizer_file) or DEFAULT_EOS_TOKEN
    text = tokenizer_file.read_text(encoding="utf-8")
    byte_tokenizer = _as_byte_tokenizer(text, eos_token)
    if byte_tokenizer is not None:
        return byte_tokenizer
    hf = hf_tokenizers.Tokenizer.from_str(text)
    if isinstance(hf.model, models.WordLevel) and hf.token_to_id(hf.model.unk_token) is not None:
        return WordTokenizer(hf, eos_token, origin=f"'{tokenizer_file}'")
    return HFTokenizer(hf, eos_token, origin=f"'{tokenizer_file}'")


def _as_byte_tokenizer(text: str, eos_token: str) -> Optional[ByteTokenizer]:
    """The ByteTokenizer whose to_json() equals this file, if there is one."""
    content = json.loads(text)
    added = sorted(content.get("added_tokens") or [], key=lambda token: token["id"])
    names = [token["content"] for token in added]
    if not names or names[0] != eos_token or [token["id"] for token in added] != list(range(256, 256 + len(names))):
        return None
    candidate = ByteTokenizer(eos_token, extra_special_tokens=names[1:])
    return candidate if json.loads(candidate.to_json()) == content else None


def build_tokenizer(cfg: TokenizerConfig, train_texts: Optional[Iterable[str]] = None) -> Tokenizer:
    """The tokenizer `cfg` asks for; bpe and word train on `train_texts` (the train split)."""
    match cfg.kind:
        case TokenizerKind.byte:
            return ByteTokenizer(cfg.eos_token)
        case TokenizerKind.bpe:
            if train_texts is None:
                raise ValueError("tokenizer.kind=bpe needs training texts; build it through prepare_dataset")
            return train_bpe_tokenizer(
                train_texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, eos_token=cfg.eos_token
            )
        case TokenizerKind.pretrained:
            return load_tokenizer(resolve_tokenizer_file(cfg.path), eos_token=cfg.eos_token)
        case TokenizerKind.word:
            if train_texts is None:
                raise ValueError("tokenizer.kind=word needs training texts; build it through prepare_dataset")
            return train_word_tokenizer(
                train_texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, eos_token=cfg.eos_token
            )
    raise ValueError(f"tokenizer.kind={cfg.kind!r} is not handled; use one of {[k.name for k in TokenizerKind]}")
