"""`lmtrain prepare`: documents -> train/val split -> tokenizer -> packed token files.

A prepared dataset is a directory `<cache_dir>/<name>-<fingerprint[:12]>/` holding
- `train.bin`, `val.bin`: every document's token ids followed by eos, documents back to back
  in corpus order; flat uint16 (vocab_size <= 65536) or uint32 in native byte order
  (little-endian on x86 and ARM), no header.
- `tokenizer.json` (+ `tokenizer_config.json`): the tokenizer, loadable by `load_tokenizer` and
  by transformers; its sha256 is meta.json's `tokenizer_hash`.
- `meta.json`: `DatasetMeta`, written last.

It is built in `<target>.tmp-<pid>-<random>` and renamed into place, so a directory with the
target's name is whole; one that fails the checks anyway (meta.json missing, a .bin of the wrong
size) is never used: prepare removes and rebuilds it, load_prepared refuses it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from lmtrain.data.config import DataConfig, TokenizerConfig, TokenizerKind
from lmtrain.data.shards import Shard, TokenSpace, check_shard

if TYPE_CHECKING:  # training only reads prepared files: `datasets` is imported where prepare needs it
    import datasets
from lmtrain.data.sources import describe_source, explicit_val_source, resolve_local_files, source_identity
from lmtrain.data.splits import compute_split, describe_sources, load_splits  # noqa: F401 - compute_split is re-exported
from lmtrain.data.tokenizers import (
    EXTRA_SPECIAL_TOKENS,
    TOKENIZER_FILE,
    WORD_UNK_TOKEN,
    Tokenizer,
    build_tokenizer,
    resolve_tokenizer_file,
)

# Bump when the layout or the meaning of the files changes: old caches then get a new directory.
FORMAT_VERSION = 1
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
META_FILE = "meta.json"
_OWNER_FILE = "owner.json"  # in a tmp dir: which host and process is building it
_SCRATCH_DIR = "scratch"  # in a tmp dir: Arrow files of datasets, deleted before the rename
_BATCH_DOCS = 1000


class MissingPreparedDataError(FileNotFoundError, ValueError):
    """The prepared dataset does not exist; caught by `except FileNotFoundError` and `except ValueError`."""


@dataclass
class DatasetMeta:
    """meta.json of a prepared dataset."""

    format_version: int
    name: str
    fingerprint: str
    dtype: str  # numpy dtype of train.bin / val.bin: "uint16" or "uint32"
    vocab_size: int
    eos_id: int
    eos_token: str
    special_token_ids: Dict[str, int]  # eos and the reserved specials the tokenizer has, by name
    tokenizer_kind: str
    tokenizer_hash: str  # sha256 of tokenizer.json
    n_train_tokens: int  # eos tokens included
    n_val_tokens: int
    n_train_docs: int
    n_val_docs: int
    train_bytes: int  # UTF-8 bytes of the train documents (eos excluded): bits per byte = nats / ln 2 / bytes
    val_bytes: int
    max_token_id: int  # largest id written in either file
    created: str  # ISO 8601, UTC
    source: str
    shards: Optional[Dict[str, List[dict]]] = None
    """None: train.bin and val.bin; else each split's shard files (`lmtrain.data.shards`)."""
    inputs: Optional[Dict[str, object]] = None
    """A sharded prepare: what it read and how (which inputs went into which shard is in `shards`)."""


class PreparedData(NamedTuple):
    meta: DatasetMeta
    train: TokenSpace  # n_train_tokens of meta.dtype, read-only
    val: TokenSpace


def token_space(directory: Path, meta: DatasetMeta, split: str) -> TokenSpace:
    """One split ("train" or "val") of a prepared dataset as one token sequence."""
    if meta.shards is None:
        n_tokens = meta.n_train_tokens if split == "train" else meta.n_val_tokens
        return TokenSpace.single(directory / f"{split}.bin", n_tokens, meta.dtype)
    return TokenSpace([Shard(directory / entry["file"], entry["n_tokens"]) for entry in meta.shards[split]], meta.dtype)


def compute_token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype holding ids 0..vocab_size-1: "uint16" up to 65536 ids, else "uint32"."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size={vocab_size} cannot be stored as token ids; it must be in [1, 2**32]")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _tokenizer_identity(cfg: TokenizerConfig) -> Dict[str, object]:
    identity: Dict[str, object] = {"kind": cfg.kind.name, "eos": cfg.eos_token, "specials": EXTRA_SPECIAL_TOKENS}
    match cfg.kind:
        case TokenizerKind.bpe:
            identity.update(
                vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, train_max_bytes=cfg.train_max_bytes
            )
        case TokenizerKind.word:
            identity.update(
                vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, train_max_bytes=cfg.train_max_bytes,
                unk=WORD_UNK_TOKEN,
            )
        case TokenizerKind.pretrained:
            identity["sha256"] = hashlib.sha256(resolve_tokenizer_file(cfg.path).read_bytes()).hexdigest()
    return identity


def compute_fingerprint(data: DataConfig, tokenizer: TokenizerConfig) -> str:
    """sha256 hex of everything that decides the bytes of the prepared files (not num_proc, not cache_dir)."""
    inputs = {
        "format_version": FORMAT_VERSION,
        "source": source_identity(data),
        "tokenizer": _tokenizer_identity(tokenizer),
        "split": {
            "val_fraction": data.val_fraction,
            "split_seed": data.split_seed,
            "text_unit": data.text_unit.name,
            "max_documents": data.max_documents,
            "text_column": data.text_column,
        },
    }
    # Keys added only when set, so that the datasets prepared before these settings existed keep their fingerprints.
    val_source = explicit_val_source(data)
    if val_source is not None:
        if data.val_paths:  # checked here first, so that an error names the setting
            resolve_local_files(data.val_paths, key="data.val_paths")
        inputs["val_source"] = source_identity(val_source)
    if data.keep_empty_documents:
        inputs["split"]["keep_empty_documents"] = True
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()


SHARDED_LAYOUT = "sharded-by-input-file-v1"


def compute_sharded_fingerprint(data: DataConfig, tokenizer: TokenizerConfig) -> str:
    """A sharded prepare's (prepare.executor=local|slurm): single's inputs plus the sharded layout, not
    the executor, tasks or workers (they do not change the bytes)."""
    base = compute_fingerprint(data, tokenizer)
    return hashlib.sha256(json.dumps({"inputs": base, "layout": SHARDED_LAYOUT}).encode("utf-8")).hexdigest()


def sharded_prepared_dir(data: DataConfig, tokenizer: TokenizerConfig) -> Path:
    return Path(data.cache_dir).expanduser() / f"{data.name}-{compute_sharded_fingerprint(data, tokenizer)[:12]}"


def prepared_dir(data: DataConfig, tokenizer: TokenizerConfig) -> Path:
    """Where `prepare_dataset` puts (or put) this dataset; does no work besides stat-ing inputs."""
    if data.prepared:
        return Path(data.prepared).expanduser()
    single = Path(data.cache_dir).expanduser() / f"{data.name}-{compute_fingerprint(data, tokenizer)[:12]}"
    if not single.exists():  # made by prepare.executor=local|slurm instead?
        sharded = sharded_prepared_dir(data, tokenizer)
        if sharded.exists():
            return sharded
    return single


def load_meta(directory: str | Path) -> DatasetMeta:
    path = Path(directory) / META_FILE
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        return DatasetMeta(**fields)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError) as error:
        raise ValueError(f"'{path}' is not a valid meta.json ({error}); prepare the dataset again") from error


def check_prepared(directory: Path, expected_fingerprint: Optional[str] = None) -> Optional[str]:
    """None when `directory` holds a whole prepared dataset, else what is wrong with it."""
    if not (directory / META_FILE).is_file():
        return f"{META_FILE} is missing"
    try:
        meta = load_meta(directory)
    except ValueError as error:
        return str(error)
    if meta.format_version != FORMAT_VERSION:
        return f"format_version is {meta.format_version}, this lmtrain writes {FORMAT_VERSION}"
    if expected_fingerprint is not None and meta.fingerprint != expected_fingerprint:
        return f"its fingerprint {meta.fingerprint[:12]} is not the expected {expected_fingerprint[:12]}"
    if meta.shards is not None:
        for split, n_tokens in (("train", meta.n_train_tokens), ("val", meta.n_val_tokens)):
            entries = meta.shards.get(split, [])
            if sum(entry["n_tokens"] for entry in entries) != n_tokens:
                return f"the {split} shards listed in meta.json do not add up to its n_{split}_tokens={n_tokens}"
            for entry in entries:
                if problem := check_shard(directory, entry, meta.dtype):
                    return problem
    itemsize = np.dtype(meta.dtype).itemsize
    single_files = () if meta.shards is not None else ((TRAIN_FILE, meta.n_train_tokens), (VAL_FILE, meta.n_val_tokens))
    for filename, n_tokens in single_files:
        path = directory / filename
        if not path.is_file():
            return f"{filename} is missing"
        if path.stat().st_size != n_tokens * itemsize:
            return (
                f"{filename} holds {path.stat().st_size} bytes but meta.json counts {n_tokens} tokens "
                f"of {meta.dtype} ({n_tokens * itemsize} bytes)"
            )
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        return f"{TOKENIZER_FILE} is missing"
    if hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() != meta.tokenizer_hash:
        return f"{TOKENIZER_FILE} does not match meta.json's tokenizer_hash"
    return None


def prepare_hint(name: str) -> str:
    """The prepare command to suggest: `data=<name>` only where a preset of that name exists."""
    from lmtrain.config import conf_dir

    if (conf_dir() / "data" / f"{name}.yaml").is_file():
        return f"run `lmtrain prepare data={name} ...` (with the same data.* and tokenizer.* settings)"
    return "run `lmtrain prepare` with the same data.* and tokenizer.* settings (it prints the directory it makes)"


def load_prepared(directory: str | Path) -> PreparedData:
    """Meta and read-only memmaps of a prepared dataset, after checking it is whole."""
    directory = Path(directory).expanduser()
    name = directory.name.rpartition("-")[0] or directory.name
    if not directory.is_dir():
        raise MissingPreparedDataError(
            f"prepared dataset '{directory}' does not exist; {prepare_hint(name)} first, or point data.prepared= at "
            "a directory it made"
        )
    problem = check_prepared(directory)
    if problem is not None:
        raise ValueError(
            f"prepared dataset '{directory}' is incomplete or damaged ({problem}); {prepare_hint(name)} again: it "
            "removes and rebuilds it"
        )
    meta = load_meta(directory)
    return PreparedData(meta, token_space(directory, meta, "train"), token_space(directory, meta, "val"))


def prepare_dataset(
    data: DataConfig, tokenizer: TokenizerConfig, *, force: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Build the prepared dataset of (data, tokenizer) unless a whole one exists; return its directory."""
    fingerprint = compute_fingerprint(data, tokenizer)
    target = Path(data.cache_dir).expanduser() / f"{data.name}-{fingerprint[:12]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target, log)
    if target.exists():
        problem = check_prepared(target, fingerprint)
        if problem is None and not force:
            log(f"prepare: '{target}' is already prepared (cached); nothing to do")
            return target
        if problem is not None:
            log(f"prepare: '{target}' is incomplete ({problem}); it will be removed and rebuilt")
        else:
            log(f"prepare: force=True: rebuilding '{target}'")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        (tmp / _OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        _build(data, tokenizer, fingerprint, tmp, log)
        return _publish(tmp, target, fingerprint, replace_whole=force, log=log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(data: DataConfig, tokenizer_cfg: TokenizerConfig, fingerprint: str, out: Path, log) -> None:
    """Write every file of the prepared dataset into `out`, meta.json last."""
    started = time.perf_counter()
    scratch = out / _SCRATCH_DIR
    log(f"prepare: loading {describe_source(data)}")
    train_docs, val_docs, train_bytes, val_bytes = load_splits(data, scratch, log)

    tokenizer = build_tokenizer(tokenizer_cfg, _tokenizer_training_texts(train_docs, train_bytes, tokenizer_cfg, log))
    tokenizer.save(out)
    if tokenizer_cfg.kind == TokenizerKind.bpe and tokenizer.vocab_size < tokenizer_cfg.vocab_size:
        log(f"prepare: the corpus ran out of pairs to merge at vocab_size {tokenizer.vocab_size} (meta.json has it)")
    if tokenizer_cfg.kind == TokenizerKind.word and tokenizer.vocab_size < tokenizer_cfg.vocab_size:
        log(f"prepare: every train word occurring >= tokenizer.min_frequency={tokenizer_cfg.min_frequency} times fits: "
            f"vocab_size {tokenizer.vocab_size} (meta.json has it)")
    dtype = compute_token_dtype(tokenizer.vocab_size)
    num_proc = data.num_proc or os.cpu_count() or 1
    log(f"prepare: tokenizing with {num_proc} process(es), vocab {tokenizer.vocab_size}, writing {dtype}")
    counts = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        tokens = _tokenize(docs, tokenizer, num_proc, scratch / f"{split}-tokens.arrow", f"{fingerprint[:16]}-{split}")
        counts[split] = _write_tokens(tokens, out / f"{split}.bin", dtype)
    shutil.rmtree(scratch, ignore_errors=True)

    max_token_id = max(counts["train"][1], counts["val"][1])
    if max_token_id >= tokenizer.vocab_size:  # a tokenizer bug would otherwise wrap around silently
        raise ValueError(f"token id {max_token_id} is >= vocab_size {tokenizer.vocab_size}; the tokenizer is broken")
    meta = DatasetMeta(
        format_version=FORMAT_VERSION,
        name=data.name,
        fingerprint=fingerprint,
        dtype=dtype,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        eos_token=tokenizer.eos_token,
        special_token_ids=tokenizer.special_token_ids(),
        tokenizer_kind=tokenizer_cfg.kind.name,
        tokenizer_hash=tokenizer.fingerprint(),
        n_train_tokens=counts["train"][0],
        n_val_tokens=counts["val"][0],
        n_train_docs=len(train_docs),
        n_val_docs=len(val_docs),
        train_bytes=int(train_bytes.sum()),
        val_bytes=int(val_bytes.sum()),
        max_token_id=max_token_id,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source=describe_sources(data),
    )
    _write_synced(out / META_FILE, (json.dumps(dataclasses.asdict(meta), indent=2) + "\n").encode("utf-8"))
    _fsync_dir(out)
    seconds = time.perf_counter() - started
    total_mb = (meta.train_bytes + meta.val_bytes) / 1e6
    log(
        f"prepare: {meta.n_train_tokens} train + {meta.n_val_tokens} val tokens from {total_mb:.1f} MB "
        f"in {seconds:.1f} s ({total_mb / seconds:.2f} MB/s)"
    )


def _tokenizer_training_texts(
    train_docs: datasets.Dataset, doc_bytes: np.ndarray, cfg: TokenizerConfig, log
) -> Optional[Iterator[List[str]]]:
    """Batches of the first train documents, up to tokenizer.train_max_bytes; None unless bpe or word."""
    if cfg.kind not in (TokenizerKind.bpe, TokenizerKind.word):
        return None
    # At least one document, even if it alone is longer than the budget.
    n_docs = max(1, int(np.searchsorted(np.cumsum(doc_bytes), cfg.train_max_bytes, side="right")))
    what = "a BPE" if cfg.kind == TokenizerKind.bpe else "a word-level"
    log(
        f"prepare: training {what} tokenizer (vocab {cfg.vocab_size}) on {n_docs} train documents, "
        f"{doc_bytes[:n_docs].sum() / 1e6:.1f} MB"
    )
    subset = train_docs.select(range(n_docs))
    return (batch["text"] for batch in subset.iter(batch_size=_BATCH_DOCS))


class _EncodeDocuments:
    """The datasets.map function: a batch of documents -> their ids, eos appended to each."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: Dict[str, List[str]]) -> Dict[str, List[List[int]]]:
        eos = [self.tokenizer.eos_id]
        # A blank document kept by data.keep_empty_documents is a lone eos, whatever the tokenizer
        # makes of its whitespace (isspace stops at the first other character: cheap on real text).
        texts = ["" if text.isspace() else text for text in batch["text"]]
        return {"ids": [ids + eos for ids in self.tokenizer.encode_batch(texts)]}


def _tokenize(
    docs: datasets.Dataset, tokenizer: Tokenizer, num_proc: int, cache_file: Path, fingerprint: str
) -> datasets.Dataset:
    """Token ids of every document, in document order whatever num_proc (datasets shards contiguously)."""
    import datasets

    return docs.map(
        _EncodeDocuments(tokenizer),
        batched=True,
        batch_size=_BATCH_DOCS,
        num_proc=min(num_proc, len(docs)),
        remove_columns=docs.column_names,
        features=datasets.Features({"ids": datasets.List(datasets.Value("uint32"))}),
        cache_file_name=str(cache_file),
        load_from_cache_file=False,  # the prepared directory is the cache; never reuse scratch files
        new_fingerprint=fingerprint,  # skips hashing the tokenizer
        desc="tokenizing",
    )


def _write_tokens(tokens: datasets.Dataset, path: Path, dtype: str) -> Tuple[int, int]:
    """Stream every row's ids into `path` back to back; returns (number of tokens, largest id)."""
    n_tokens, max_id = 0, 0
    with open(path, "wb") as out:
        for table in tokens.with_format("arrow").iter(batch_size=10 * _BATCH_DOCS):
            # flatten() honours the slice offsets of the list array; .values would not.
            ids = table.column("ids").combine_chunks().flatten().to_numpy()
            if len(ids):
                max_id = max(max_id, int(ids.max()))
            out.write(ids.astype(dtype).tobytes())
            n_tokens += len(ids)
        out.flush()
        os.fsync(out.fileno())
    return n_tokens, max_id


def _write_synced(path: Path, content: bytes) -> None:
    with open(path, "wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, target: Path, fingerprint: str, *, replace_whole: bool, log) -> Path:
    """Rename the finished tmp dir to `target`, replacing a broken one there (or a whole one if `replace_whole`)."""
    for path in tmp.iterdir():  # fsync what tokenizer.save wrote
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    (tmp / _OWNER_FILE).unlink()
    if target.exists() and not replace_whole and check_prepared(target, fingerprint) is None:
        log(f"prepare: another process prepared '{target}' first; using it")  # e.g. every rank ran prepare
        return target
    if target.exists():
        # Move the old one aside under a tmp name, so a crash here leaves a stale tmp dir, not a broken target.
        trash = tmp.with_name(tmp.name + "-old")
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:
        if check_prepared(target, fingerprint) is None:  # another prepare of the same inputs finished first
            log(f"prepare: another process prepared '{target}' first; using it")
            return target
        raise
    _fsync_dir(target.parent)
    log(f"prepare: wrote '{target}'")
    return target


def _remove_stale_tmp_dirs(target: Path, log) -> None:
    """Delete `<target>.tmp-*` dirs whose builder (on this host) is no longer running."""
    for tmp in target.parent.glob(f"{target.name}.tmp-*"):
        owner_file = tmp / _OWNER_FILE
        owner: Dict[str, object] = {}
        try:
            owner = json.loads(owner_file.read_text()) if owner_file.is_file() else {}
            pid = int(owner.get("pid") or tmp.name.split(".tmp-", 1)[1].split("-")[0])
        except (ValueError, IndexError, OSError):
            pid = -1
        if owner.get("host", socket.gethostname()) != socket.gethostname():
            continue  # built on another host of a shared filesystem: its pid means nothing here
        if pid == os.getpid() or _pid_alive(pid):
            continue
        log(f"prepare: removing '{tmp}', left by a prepare (pid {pid}) that no longer runs")
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
