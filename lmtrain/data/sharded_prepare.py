"""`lmtrain prepare prepare.executor=local|slurm`: a corpus too big for one process, prepared by datatrove tasks.

The result is a prepared dataset in the sharded layout of `lmtrain.data.shards`, read by `load_prepared`
and `lmtrain train data.prepared=<dir>` like any other. How it is made:

1. The launching process lists the input files (`sharded_inputs.resolve_inputs`), trains the bpe/word
   tokenizer once on the first tokenizer.train_max_bytes of the train documents (byte and pretrained
   tokenizers just load) and writes tokenizer.json and plan.json into the work dir `<target>.work/`.
2. datatrove runs `prepare.tasks` tasks (LocalPipelineExecutor, or SlurmPipelineExecutor's job array);
   task r takes input files r, r+K, r+2K, ... and writes, per file i, `train/NNNNNN.bin` and
   `val/NNNNNN.bin` (+ .idx) with `write_shard` (.tmp names renamed when whole), then
   `records/NNNNNN.json`, last. A document goes to val by a keyed hash of (split_seed, i, its position
   in the file) against data.val_fraction (`compute_document_is_val`). Nothing depends on K or on the
   executor: the concatenated shards are the same token space, and the fingerprint leaves them out.
3. datatrove marks a finished task complete; a rerun runs only the others (and, inside a task, skips
   the files whose record and shards are whole). A killed task's .tmp files are never read: shards
   count only through their record, and the finishing step deletes leftovers.
4. The finishing step checks every record and shard, writes meta.json (with `shards`: each shard's
   file, counts and input file) last and renames the work dir to the target.

It differs from prepare.executor=single: the split is per document (on average val_fraction of the
documents, not exactly ceil(n * val_fraction)) and the files are shards, so its fingerprint, and its
directory, differ from single's. data.max_documents and data.keep_empty_documents are not supported.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from lmtrain.data.config import DataConfig, PrepareExecutionConfig, TokenizerConfig, TokenizerKind
from lmtrain.data.prepare import (
    FORMAT_VERSION,
    META_FILE,
    DatasetMeta,
    _fsync_dir,
    _write_synced,
    check_prepared,
    SHARDED_LAYOUT,
    compute_sharded_fingerprint,
    compute_token_dtype,
    sharded_prepared_dir,  # noqa: F401 - re-exported
)
from lmtrain.data.sharded_executors import build_executor, run_executor
from lmtrain.data.sharded_inputs import VAL, InputFile, resolve_inputs
from lmtrain.data.sharded_step import RECORDS_DIR, TokenizeInputFiles, load_record, record_problem
from lmtrain.data.splits import describe_sources
from lmtrain.data.tokenizers import TOKENIZER_FILE, build_tokenizer

PLAN_FILE = "plan.json"
_LOCK_FILE = ".lock"


def prepare_sharded(data: DataConfig, tokenizer: TokenizerConfig, execution: PrepareExecutionConfig, *,
                    force: bool = False, log: Callable[[str], None] = print) -> Optional[Path]:
    """Prepare `data` with datatrove tasks; returns the dataset's directory, or None when a SLURM array was
    submitted without waiting (prepare.slurm_wait=false: run the same command again once it has ended)."""
    _check_supported(data)
    fingerprint = compute_sharded_fingerprint(data, tokenizer)
    target = Path(data.cache_dir).expanduser() / f"{data.name}-{fingerprint[:12]}"
    work = target.with_name(target.name + ".work")
    if target.exists() and not force:
        problem = check_prepared(target, fingerprint)
        if problem is None:
            log(f"prepare: '{target}' is already prepared (cached); nothing to do")
            return target
        log(f"prepare: '{target}' is incomplete ({problem}); it will be rebuilt")
    work.mkdir(parents=True, exist_ok=True)
    with _locked(work):
        if force and (work / PLAN_FILE).exists():
            log(f"prepare: force=True: starting '{work}' afresh")
            _clear(work)
        plan = _load_or_make_plan(work, data, tokenizer, fingerprint, log)
        step = TokenizeInputFiles(work_dir=str(work), plan=plan)
        logging_dir = _logging_dir(work, execution, fingerprint)
        started = time.perf_counter()
        if not run_executor(build_executor([step], execution, logging_dir, job_name=f"lmtrain-prepare-{data.name}"),
                            execution, work, plan, log):
            return None
        meta = _finish(work, target, plan, data, tokenizer, fingerprint, log)
    seconds = time.perf_counter() - started
    total_mb = (meta.train_bytes + meta.val_bytes) / 1e6
    log(f"prepare: {meta.n_train_tokens} train + {meta.n_val_tokens} val tokens from {total_mb:.1f} MB in "
        f"{len(plan['inputs'])} shards, {seconds:.1f} s with {execution.tasks} task(s) ({total_mb / seconds:.2f} MB/s)")
    return target


def _check_supported(data: DataConfig) -> None:
    if data.max_documents is not None:
        raise ValueError(f"data.max_documents={data.max_documents} counts documents across files, which tasks "
                         "cannot; give fewer files, or use prepare.executor=single")
    if data.keep_empty_documents:
        raise ValueError("data.keep_empty_documents=true is not supported by a sharded prepare (datatrove's readers "
                         "drop empty rows); use prepare.executor=single")


class _locked:
    """An exclusive lock on the work dir for this launching process (tasks do not take it)."""

    def __init__(self, work: Path):
        self.path = work / _LOCK_FILE

    def __enter__(self):
        self.handle = open(self.path, "w")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise ValueError(f"another `lmtrain prepare` is working on '{self.path.parent}'; wait for it to end") from None
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def _clear(work: Path) -> None:
    for path in work.iterdir():
        if path.name != _LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _logging_dir(work: Path, execution: PrepareExecutionConfig, fingerprint: str) -> str:
    """datatrove's completion markers are per task number, so each number of tasks gets its own directory."""
    base = Path(execution.logging_dir).expanduser() / fingerprint[:12] if execution.logging_dir else work / "logs"
    return str(base / f"tasks-{execution.tasks}")


def _load_or_make_plan(work: Path, data: DataConfig, tokenizer_cfg: TokenizerConfig, fingerprint: str, log) -> dict:
    """plan.json: the inputs and the tokenizer every task uses. Made once (the tokenizer trained here), reused
    by reruns, so that a rerun's tasks write what the first run's did."""
    plan_path = work / PLAN_FILE
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        tokenizer_file = work / TOKENIZER_FILE
        if plan.get("fingerprint") == fingerprint and tokenizer_file.is_file() and \
                hashlib.sha256(tokenizer_file.read_bytes()).hexdigest() == plan["tokenizer_hash"]:
            log(f"prepare: resuming '{work}' ({len(plan['inputs'])} input files, its tokenizer)")
            return plan
        log(f"prepare: '{work}' holds another plan or a damaged tokenizer; starting afresh")
        _clear(work)
    inputs = resolve_inputs(data)
    log(f"prepare: {len(inputs)} input files; {describe_sources(data)}")
    tokenizer = build_tokenizer(tokenizer_cfg, _training_texts(inputs, data, tokenizer_cfg, log))
    tokenizer.save(work)
    plan = {
        "fingerprint": fingerprint,
        "inputs": [source.to_dict() for source in inputs],
        "text_column": data.text_column,
        "val_fraction": data.val_fraction,
        "split_seed": data.split_seed,
        "eos_token": tokenizer.eos_token,
        "dtype": compute_token_dtype(tokenizer.vocab_size),
        "tokenizer_hash": tokenizer.fingerprint(),
    }
    _write_synced(plan_path, json.dumps(plan, indent=2).encode("utf-8"))
    return plan


def _training_texts(inputs: List[InputFile], data: DataConfig, cfg: TokenizerConfig, log) -> Optional[Iterator[str]]:
    """The first train documents, in input order, up to tokenizer.train_max_bytes (at least one): the documents
    the tasks put in train, read the same way. None unless bpe or word."""
    if cfg.kind not in (TokenizerKind.bpe, TokenizerKind.word):
        return None
    from lmtrain.data.sharded_step import split_documents

    def texts() -> Iterator[str]:
        n_bytes, n_docs = 0, 0
        for source in inputs:
            if source.role == VAL:
                continue
            for is_val, text, size in split_documents(source, data.text_column, data.val_fraction, data.split_seed):
                if is_val:
                    continue
                if n_docs and n_bytes + size > cfg.train_max_bytes:
                    log(f"prepare: trained the tokenizer on {n_docs} train documents, {n_bytes / 1e6:.1f} MB")
                    return
                n_bytes, n_docs = n_bytes + size, n_docs + 1
                yield text
        log(f"prepare: trained the tokenizer on all {n_docs} train documents, {n_bytes / 1e6:.1f} MB")

    log(f"prepare: training a {cfg.kind.name} tokenizer (vocab {cfg.vocab_size}) on up to {cfg.train_max_bytes / 1e6:.1f} "
        "MB of train documents, once, before the tasks")
    return texts()


def _finish(work: Path, target: Path, plan: dict, data: DataConfig, tokenizer_cfg: TokenizerConfig,
            fingerprint: str, log) -> DatasetMeta:
    """Check every input's record and shards, write meta.json last, rename the work dir to `target`."""
    shards: Dict[str, List[dict]] = {"train": [], "val": []}
    totals = {key: 0 for key in ("train_tokens", "val_tokens", "train_docs", "val_docs", "train_bytes", "val_bytes")}
    max_token_id = 0
    missing = []
    for source in map(lambda fields: InputFile(**fields), plan["inputs"]):
        problem = record_problem(work, source, plan)
        if problem:
            missing.append(f"{source.path}: {problem}")
            continue
        record = load_record(work, source.index)
        for split in ("train", "val"):
            part = record[split]
            shards[split].append({"file": part["file"], "n_tokens": part["n_tokens"], "n_docs": part["n_docs"],
                                  "inputs": [source.path]})
            totals[f"{split}_tokens"] += part["n_tokens"]
            totals[f"{split}_docs"] += part["n_docs"]
            totals[f"{split}_bytes"] += part["n_bytes"]
            max_token_id = max(max_token_id, part["max_token_id"])
    if missing:
        raise ValueError(f"{len(missing)} of {len(plan['inputs'])} input files are not prepared (a task failed or was "
                         f"killed), e.g. {missing[0]}; run the same command again: it reruns only those tasks")
    for split in ("train", "val"):
        if totals[f"{split}_docs"] == 0:
            raise ValueError(f"the {split} split is empty: {totals['train_docs'] + totals['val_docs']} documents with "
                             f"data.val_fraction={data.val_fraction}; give more documents or change data.val_fraction")
    from lmtrain.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(work / TOKENIZER_FILE, eos_token=plan["eos_token"])
    if max_token_id >= tokenizer.vocab_size:  # a tokenizer bug would otherwise wrap around silently
        raise ValueError(f"token id {max_token_id} is >= vocab_size {tokenizer.vocab_size}; the tokenizer is broken")
    meta = DatasetMeta(
        format_version=FORMAT_VERSION, name=data.name, fingerprint=fingerprint, dtype=plan["dtype"],
        vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, eos_token=tokenizer.eos_token,
        special_token_ids=tokenizer.special_token_ids(), tokenizer_kind=tokenizer_cfg.kind.name,
        tokenizer_hash=plan["tokenizer_hash"],
        n_train_tokens=totals["train_tokens"], n_val_tokens=totals["val_tokens"],
        n_train_docs=totals["train_docs"], n_val_docs=totals["val_docs"],
        train_bytes=totals["train_bytes"], val_bytes=totals["val_bytes"], max_token_id=max_token_id,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source=describe_sources(data), shards=shards,
        inputs={
            "layout": SHARDED_LAYOUT,
            "unit": "one train and one val shard per input file, in input order",
            "split": "per document: keyed hash of (split_seed, input index, position among the file's documents) "
                     "< val_fraction; role val = all val, train = all train",
            "files": [{"index": i["index"], "path": i["path"], "role": i["role"], "format": i["format"],
                       "streaming": i["streaming"]} for i in plan["inputs"]],
            "text_column": plan["text_column"], "val_fraction": plan["val_fraction"], "split_seed": plan["split_seed"],
        },
    )
    for leftover in [*work.glob("train/*.tmp"), *work.glob("val/*.tmp")]:  # from killed tasks; never counted
        leftover.unlink()
    shutil.rmtree(work / RECORDS_DIR)
    (work / PLAN_FILE).unlink()
    for path in [*work.glob("*.json"), *work.glob("train/*"), *work.glob("val/*")]:
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())
    _write_synced(work / META_FILE, (json.dumps(dataclasses.asdict(meta), indent=2) + "\n").encode("utf-8"))
    _fsync_dir(work)
    problem = check_prepared(work, fingerprint)
    if problem:
        raise ValueError(f"the prepared dataset in '{work}' fails its own check ({problem}); this is a bug")
    _publish(work, target, log)
    return meta


def _publish(work: Path, target: Path, log) -> None:
    (work / _LOCK_FILE).unlink()  # still held through the open handle until the caller's `with` ends
    if target.exists():
        # Aside under another name first, so a crash here leaves a stale dir, not a broken target.
        trash = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    work.rename(target)
    _fsync_dir(target.parent)
    log(f"prepare: wrote '{target}'")
