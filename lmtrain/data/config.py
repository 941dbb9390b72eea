"""Structured configs of `lmtrain prepare`: where documents come from and how they become tokens.

These are OmegaConf structured-config schemas (Hydra groups `data/` and `tokenizer/`), so fields
are only int/float/bool/str/Enum/Optional/List[str]. The docstring under each field is its help
text. `__post_init__` runs when OmegaConf builds the object (`OmegaConf.to_object`), after every
override has been applied, and rejects a bad value with the field's full name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional, Type, TypeVar

# Byte-level BPE starts from 256 byte symbols plus the eos token and the five extra specials of
# `lmtrain.data.tokenizers.EXTRA_SPECIAL_TOKENS`; a vocabulary that small learns no merge.
MIN_BPE_VOCAB_SIZE = 256 + 1 + 5 + 1
# A word-level vocabulary starts with eos, the five extra specials and `<unk>`; it needs room for a word.
N_WORD_SPECIALS = 1 + 5 + 1
MIN_WORD_VOCAB_SIZE = N_WORD_SPECIALS + 1


class SourceKind(Enum):
    """Where the documents come from."""

    python_stdlib = "python_stdlib"
    text = "text"
    json = "json"
    csv = "csv"
    parquet = "parquet"
    hub = "hub"


class TextUnit(Enum):
    """How a plain-text file splits into documents (source `text` only)."""

    document = "document"
    paragraph = "paragraph"
    line = "line"


class TokenizerKind(Enum):
    byte = "byte"
    bpe = "bpe"
    pretrained = "pretrained"
    word = "word"


EnumT = TypeVar("EnumT", bound=Enum)


def coerce_enum(enum_cls: Type[EnumT], value: object, field_name: str) -> EnumT:
    """Return `value` as a member of `enum_cls`; OmegaConf hands over members, Python callers may pass names."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls[str(value)]
    except KeyError:
        choices = ", ".join(member.name for member in enum_cls)
        raise ValueError(f"{field_name}={value!r} is not a valid choice; use one of: {choices}") from None


@dataclass
class MixtureSource:
    """One prepared dataset of a training mixture (data.sources)."""

    name: str = "???"
    """Short name: metrics report it as val/<name>/loss."""

    prepared: str = "???"
    """A directory made by `lmtrain prepare` (printed at its end)."""

    weight: float = 1.0
    """Share of the training samples (weights are normalized over the sources)."""

    max_tokens: Optional[int] = None
    """Use only the first N train tokens of this source (null: all)."""

    max_epochs: Optional[float] = None
    """Refuse a run whose trainer.max_steps would read this source more than N times over (null: no cap)."""

    def check(self, where: str) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}.name={self.name!r} must be a short name of letters, digits, '_' or '-' "
                             "(it names the metric val/<name>/loss)")
        if not self.weight > 0 or math.isinf(self.weight):
            raise ValueError(f"{where}.weight={self.weight} must be a positive number (weights are normalized)")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"{where}.max_tokens={self.max_tokens} must be at least 2 (or null for all)")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise ValueError(f"{where}.max_epochs={self.max_epochs} must be > 0 (or null for no cap)")


@dataclass
class DataConfig:
    name: str = "python_stdlib"
    """Short name of the corpus; the prepared dataset lives in <cache_dir>/<name>-<fingerprint>/."""

    source: SourceKind = SourceKind.python_stdlib
    """python_stdlib (every *.py of this interpreter's standard library), text, json (JSON lines), csv, parquet, or hub."""

    paths: List[str] = field(default_factory=list)
    """Files or glob patterns (~ expanded) for the text, json, csv and parquet sources."""

    csv_delimiter: str = ","
    """csv source: the field separator (use '\\t' for TSV files)."""

    text_unit: TextUnit = TextUnit.document
    """Text files only: one document per file, per blank-line-separated paragraph, or per line."""

    hub_name: Optional[str] = None
    """Hub dataset name for source=hub, e.g. Salesforce/wikitext."""

    hub_config: Optional[str] = None
    """Hub dataset configuration, e.g. wikitext-103-raw-v1."""

    hub_split: str = "train"
    """Hub split to read; lmtrain makes its own train/val split from it (unless data.hub_val_split is set)."""

    text_column: str = "text"
    """Column holding the document text (json, csv, parquet, hub); for task=classify, the text to classify."""

    val_paths: List[str] = field(default_factory=list)
    """Local files (or globs) of the validation documents or examples, read like data.paths: then
    data.paths is all train and nothing is held out. Empty = hold out data.val_fraction of data.paths
    (or use data.hub_val_split)."""

    hub_val_split: Optional[str] = None
    """source=hub: the split to validate on, e.g. validation; then data.hub_split is all train.
    null = hold out data.val_fraction of data.hub_split."""

    keep_empty_documents: bool = False
    """Keep empty and whitespace-only documents, as a lone eos each (false: drop them). WikiText's
    published token counts (and PyTorch's word_language_model) have one <eos> per line, blank lines
    included: the wikitext2 presets set it."""

    # -- labelled examples for fine-tuning tasks (classify, qa, translate) ---------------------------

    label_column: str = "label"
    """classify: the column of labels (ints, or strings mapped to ids in sorted order)."""

    text_pair_column: Optional[str] = None
    """classify: a second text (sentence-pair tasks such as NLI), joined to the first by the separator token."""

    question_column: str = "question"
    """qa: the question."""

    context_column: str = "context"
    """qa: the passage that holds the answer."""

    answers_column: str = "answers"
    """qa: SQuAD-format answers: {"text": [...], "answer_start": [character offsets into the context]}."""

    id_column: Optional[str] = None
    """qa: a column naming each example in errors and predictions (SQuAD's "id"); null = row numbers."""

    source_column: str = "source"
    """translate: the source text (when translation_column is null)."""

    target_column: str = "target"
    """translate: the reference translation (when translation_column is null)."""

    translation_column: Optional[str] = None
    """translate: a column of {language: text} dicts (the WMT/OPUS layout on the hub); then
    source_lang and target_lang pick the two sides."""

    source_lang: str = "de"
    target_lang: str = "en"

    val_fraction: float = 0.01
    """Fraction of documents held out for validation (rounded up to whole documents)."""

    split_seed: int = 1234
    """Seed of the document-level train/val split."""

    max_documents: Optional[int] = None
    """Keep only the first N non-empty documents (quick runs); None keeps all."""

    num_proc: Optional[int] = None
    """Tokenizer processes; None uses every CPU core. Does not change the output."""

    cache_dir: str = "~/.cache/lmtrain/data"
    """Directory that holds prepared datasets."""
    prepared: Optional[str] = None
    """A directory made by `lmtrain prepare` (meta.json with train/val token files or shards), used as
    it is: for data prepared on another machine, where the source paths or Python version differ."""

    sources: List[MixtureSource] = field(default_factory=list)
    """Train on a weighted mixture of prepared datasets instead (`data=mixture`), e.g.
    data.sources='[{name: web, prepared: /data/web-1a2b, weight: 0.7}, {name: code, prepared: /data/code-3c4d, weight: 0.3}]'.
    Every source must use the same tokenizer. Validation reports each source's loss and their weighted mean."""

    def __post_init__(self) -> None:
        names = [source.name for source in self.sources]
        for i, source in enumerate(self.sources):
            source.check(f"data.sources[{i}]")
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names {names} repeat a name; give each source its own")
        if self.sources and self.prepared:
            raise ValueError(f"data.prepared={self.prepared!r} and data.sources are both set; a mixture names the "
                             "prepared directory of each source: clear data.prepared")
        self.source = coerce_enum(SourceKind, self.source, "data.source")
        self.text_unit = coerce_enum(TextUnit, self.text_unit, "data.text_unit")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(
                f"data.name={self.name!r} cannot name a directory; use a short name without '/', "
                "e.g. data.name=my_corpus"
            )
        if self.source in (SourceKind.text, SourceKind.json, SourceKind.csv, SourceKind.parquet) and not self.paths:
            raise ValueError(
                f"data.paths is empty but data.source={self.source.name} reads local files; "
                "set data.paths=[/path/to/file_or_glob, ...]"
            )
        if self.source == SourceKind.hub and not self.hub_name:
            raise ValueError(
                f"data.hub_name={self.hub_name!r} but data.source=hub needs a dataset name; "
                "set data.hub_name=<owner/name>, e.g. Salesforce/wikitext"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction={self.val_fraction} must be strictly between 0 and 1; "
                "the default 0.01 holds out 1% of the documents"
            )
        if self.max_documents is not None and self.max_documents < 2:
            raise ValueError(
                f"data.max_documents={self.max_documents} leaves no room for a train and a val document; "
                "use at least 2, or null for all documents"
            )
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc} must be at least 1, or null for every CPU core")
        if not self.text_column:
            raise ValueError("data.text_column is empty; name the column holding the text, e.g. data.text_column=text")
        if len(self.csv_delimiter) != 1:
            raise ValueError(f"data.csv_delimiter={self.csv_delimiter!r} must be one character, e.g. ',' or '\\t'")
        if not self.cache_dir:
            raise ValueError("data.cache_dir is empty; set a directory, e.g. data.cache_dir=~/.cache/lmtrain/data")
        if self.val_paths and self.source not in (SourceKind.text, SourceKind.json, SourceKind.csv, SourceKind.parquet):
            raise ValueError(
                f"data.val_paths={list(self.val_paths)} names local files but data.source={self.source.name} does not "
                "read local files; for a hub dataset set data.hub_val_split=<split> instead, or clear data.val_paths"
            )
        if self.hub_val_split and self.source != SourceKind.hub:
            raise ValueError(
                f"data.hub_val_split={self.hub_val_split!r} but data.source={self.source.name}, not hub; "
                "for local files set data.val_paths=[...] instead, or set data.hub_val_split=null"
            )


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.bpe
    """byte (256 byte ids + specials), bpe (byte-level BPE trained on the train split), pretrained, or
    word (whitespace-separated words counted on the train split; the rest become <unk>)."""

    vocab_size: int = 4096
    """bpe, word: vocabulary size to train, special tokens included (word: the most frequent words are kept)."""

    min_frequency: int = 2
    """bpe: a pair must occur at least this often to be merged; word: a word occurring fewer times is <unk>."""

    train_max_bytes: int = 200_000_000
    """bpe, word: train on at most this many UTF-8 bytes of the train split (the first documents, in order)."""

    path: Optional[str] = None
    """pretrained: a tokenizer.json file, or a directory holding one."""

    eos_token: str = "<|endoftext|>"
    """End-of-document token appended after every document."""

    def __post_init__(self) -> None:
        self.kind = coerce_enum(TokenizerKind, self.kind, "tokenizer.kind")
        if self.kind == TokenizerKind.bpe and self.vocab_size < MIN_BPE_VOCAB_SIZE:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} is too small for byte-level BPE (256 byte symbols "
                f"and 6 special tokens come first); use at least {MIN_BPE_VOCAB_SIZE}, e.g. 4096"
            )
        if self.kind == TokenizerKind.word and self.vocab_size < MIN_WORD_VOCAB_SIZE:
            raise ValueError(
                f"tokenizer.vocab_size={self.vocab_size} leaves no room for a word: a word-level vocabulary starts "
                f"with {N_WORD_SPECIALS} special tokens (eos, pad, bos, mask, sep, <|unk|>, <unk>); use at least "
                f"{MIN_WORD_VOCAB_SIZE}, e.g. 50000"
            )
        if self.kind == TokenizerKind.word and self.eos_token == "<unk>":
            raise ValueError(
                "tokenizer.eos_token='<unk>' is the unknown-word token of tokenizer.kind=word; "
                "use another, e.g. tokenizer.eos_token='<|endoftext|>'"
            )
        if self.min_frequency < 1:
            raise ValueError(f"tokenizer.min_frequency={self.min_frequency} must be at least 1")
        if self.train_max_bytes < 1:
            raise ValueError(f"tokenizer.train_max_bytes={self.train_max_bytes} must be positive, e.g. 200000000")
        if self.kind == TokenizerKind.pretrained and not self.path:
            raise ValueError(
                "tokenizer.path is not set but tokenizer.kind=pretrained needs one; "
                "set tokenizer.path=/path/to/tokenizer.json (or a directory holding it)"
            )
        if not self.eos_token:
            raise ValueError("tokenizer.eos_token is empty; set it, e.g. tokenizer.eos_token='<|endoftext|>'")


class PrepareExecutor(Enum):
    """How `lmtrain prepare` runs: one process, or datatrove tasks (one shard per input file)."""

    single = "single"
    local = "local"
    slurm = "slurm"


_SLURM_MEMORY = re.compile(r"^[1-9][0-9]*[KMGT]?$")


@dataclass
class PrepareExecutionConfig:
    """`prepare.*`: where the work of `lmtrain prepare` runs. local and slurm run datatrove tasks that write one
    train shard and one val shard per input file (lmtrain.data.sharded_prepare); the number of tasks and the
    executor do not change a byte of the result, single's layout and split differ (see that module)."""

    executor: PrepareExecutor = PrepareExecutor.single
    """single (one process, train.bin/val.bin), local (datatrove tasks on this machine) or slurm (a job array)."""

    tasks: int = 1
    """local, slurm: datatrove tasks; task r takes input files r, r+tasks, r+2*tasks, ... (more tasks than files idle)."""

    workers: Optional[int] = None
    """local: tasks run at once (null = min(tasks, CPU cores)); slurm: array tasks run at once (null = no limit)."""

    logging_dir: Optional[str] = None
    """datatrove's logs, stats and completion markers; null = logs/ inside the dataset's work dir (kept with the
    dataset). A task with a completion marker there is not run again."""

    slurm_partition: Optional[str] = None
    """slurm: the partition of the job array (required)."""

    slurm_time: str = "04:00:00"
    """slurm: time limit of each array task (sbatch --time)."""

    slurm_cpus_per_task: int = 1
    """slurm: CPUs of each array task (a task tokenizes on one core; more gives it more memory)."""

    slurm_mem_per_cpu: str = "2G"
    """slurm: sbatch --mem-per-cpu, e.g. 2G or 500M."""

    slurm_qos: Optional[str] = None
    """slurm: sbatch --qos; null = the cluster's default."""

    slurm_wait: bool = True
    """slurm: wait for the array and finish the dataset; false = submit and return (run the same command again
    after the array ends to finish it)."""

    def __post_init__(self) -> None:
        self.executor = coerce_enum(PrepareExecutor, self.executor, "prepare.executor")
        if self.tasks < 1:
            raise ValueError(f"prepare.tasks={self.tasks} must be at least 1 (the number of datatrove tasks)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"prepare.workers={self.workers} must be at least 1, or null")
        if self.executor == PrepareExecutor.slurm and not self.slurm_partition:
            raise ValueError(f"prepare.slurm_partition={self.slurm_partition!r} but prepare.executor=slurm needs a "
                             "partition; set prepare.slurm_partition=<name> (sinfo lists them)")
        if not self.slurm_time:
            raise ValueError("prepare.slurm_time is empty; set a time limit, e.g. prepare.slurm_time=04:00:00")
        if self.slurm_cpus_per_task < 1:
            raise ValueError(f"prepare.slurm_cpus_per_task={self.slurm_cpus_per_task} must be at least 1")
        if not _SLURM_MEMORY.match(self.slurm_mem_per_cpu):
            raise ValueError(f"prepare.slurm_mem_per_cpu={self.slurm_mem_per_cpu!r} is not a SLURM memory size; "
                             "use e.g. 2G or 500M")
