"""Data: sources, tokenizers, and `prepare` (tokenize + pack into memmapped token files).

The datamodules and samplers that read the packed files live in `datamodule.py` / `sampler.py`.
"""

from lmtrain.data.config import DataConfig, SourceKind, TextUnit, TokenizerConfig, TokenizerKind
from lmtrain.data.prepare import (
    FORMAT_VERSION,
    META_FILE,
    TRAIN_FILE,
    VAL_FILE,
    DatasetMeta,
    MissingPreparedDataError,
    PreparedData,
    check_prepared,
    compute_fingerprint,
    compute_split,
    compute_token_dtype,
    load_meta,
    load_prepared,
    prepare_dataset,
    prepared_dir,
)
from lmtrain.data.tokenizers import (
    EXTRA_SPECIAL_TOKENS,
    TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
    train_word_tokenizer,
)

__all__ = [
    "DataConfig",
    "SourceKind",
    "TextUnit",
    "TokenizerConfig",
    "TokenizerKind",
    "FORMAT_VERSION",
    "META_FILE",
    "TRAIN_FILE",
    "VAL_FILE",
    "DatasetMeta",
    "MissingPreparedDataError",
    "PreparedData",
    "check_prepared",
    "compute_fingerprint",
    "compute_split",
    "compute_token_dtype",
    "load_meta",
    "load_prepared",
    "prepare_dataset",
    "prepared_dir",
    "EXTRA_SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "train_bpe_tokenizer",
    "train_word_tokenizer",
]
