"""The datatrove pipeline step of a sharded prepare: input files -> documents -> split -> token shards.

Each input file i becomes `train/NNNNNN.bin` and `val/NNNNNN.bin` (lmtrain.data.shards) and then
`records/NNNNNN.json` (counts, bytes, the file's path), written last and atomically: a record whose
shards check whole means input i is done, whichever task, run or attempt made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
from datatrove.pipeline.base import PipelineStep

from lmtrain.data.shards import check_shard, write_shard
from lmtrain.data.sharded_inputs import TRAIN, VAL, InputFile, read_texts
from lmtrain.data.splits import compute_document_is_val
from lmtrain.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer

RECORDS_DIR = "records"
_BATCH_DOCS = 1000


def shard_file(split: str, index: int) -> str:
    return f"{split}/{index:06d}.bin"


def split_documents(source: InputFile, text_column: str, val_fraction: float,
                    seed: int) -> Iterator[Tuple[bool, str, int]]:
    """(goes to val, text, UTF-8 bytes) of each non-blank document of one input file, in file order.

    A document's position counts every row with text, blank ones too, so the split of a document does
    not depend on which reader read the file."""
    position = 0
    for texts in _batches(read_texts(source, text_column), _BATCH_DOCS):
        positions = np.arange(position, position + len(texts), dtype=np.uint64)
        position += len(texts)
        if source.role == VAL:
            is_val = np.ones(len(texts), dtype=bool)
        elif source.role == TRAIN:
            is_val = np.zeros(len(texts), dtype=bool)
        else:
            is_val = compute_document_is_val(source.index, positions, val_fraction, seed)
        for text, val in zip(texts, is_val):
            if not text.isspace():  # texts are non-empty: blank means whitespace only
                yield bool(val), text, len(text.encode("utf-8"))


def _batches(items: Iterator[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_record(work: Path, index: int) -> dict:
    return json.loads((work / RECORDS_DIR / f"{index:06d}.json").read_text())


def record_problem(work: Path, source: InputFile, plan: dict) -> Optional[str]:
    """None when input `source` is done: its record names this tokenizer and both its shards are whole."""
    path = work / RECORDS_DIR / f"{source.index:06d}.json"
    if not path.is_file():
        return "no record (not done)"
    record = json.loads(path.read_text())
    if record.get("tokenizer_hash") != plan["tokenizer_hash"] or record.get("path") != source.path:
        return "its record is from another plan"
    for split in ("train", "val"):
        if problem := check_shard(work, record[split], plan["dtype"]):
            return problem
    return None


class TokenizeInputFiles(PipelineStep):
    """Task `rank` of `world_size` tokenizes input files rank, rank + world_size, ... into their shards.

    Holds paths and the plan only (it is pickled into every task); the tokenizer is loaded in the task."""

    name = "lmtrain tokenize input files"
    type = "TOKENIZER"

    def __init__(self, work_dir: str, plan: dict):
        super().__init__()
        self.work_dir = work_dir
        self.plan = plan

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        # One task, one core: K tasks on K cores, not K x every core (HF tokenizers would use all of them).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        work = Path(self.work_dir)
        tokenizer_path = work / TOKENIZER_FILE
        if hashlib.sha256(tokenizer_path.read_bytes()).hexdigest() != self.plan["tokenizer_hash"]:
            raise ValueError(f"'{tokenizer_path}' is not the tokenizer of this prepare's plan; run prepare again")
        tokenizer = load_tokenizer(tokenizer_path, eos_token=self.plan["eos_token"])
        for fields in self.plan["inputs"][rank::world_size]:
            source = InputFile(**fields)
            if record_problem(work, source, self.plan) is None:
                self.stat_update("input_files_already_done")
                continue
            with self.track_time("input_file"):
                self._write(work, source, tokenizer)
            self.stat_update("input_files")
        return iter(())  # writes files; passes no documents on

    def _write(self, work: Path, source: InputFile, tokenizer: Tokenizer) -> None:
        dtype, eos = self.plan["dtype"], tokenizer.eos_id
        val_docs: List[np.ndarray] = []  # held in memory: data.val_fraction of one file
        counts = {"train": 0, "val": 0}  # UTF-8 bytes
        n_train_docs = 0

        def train_docs() -> Iterator[np.ndarray]:
            nonlocal n_train_docs
            for is_val, ids, n_bytes in self._encoded(source, tokenizer, eos):
                split = "val" if is_val else "train"
                counts[split] += n_bytes
                if is_val:
                    val_docs.append(ids)
                else:
                    fault_point(source.index, n_train_docs)
                    n_train_docs += 1
                    yield ids

        record = {"index": source.index, "path": source.path, "tokenizer_hash": self.plan["tokenizer_hash"]}
        for split, documents in (("train", train_docs()), ("val", val_docs)):
            entry = write_shard(work / shard_file(split, source.index), documents, dtype)
            record[split] = {"file": shard_file(split, source.index), "n_bytes": counts[split], **entry}
            self.stat_update(f"{split}_tokens", value=entry["n_tokens"])
        path = work / RECORDS_DIR / f"{source.index:06d}.json"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def _encoded(self, source: InputFile, tokenizer: Tokenizer, eos: int) -> Iterator[Tuple[bool, np.ndarray, int]]:
        """(goes to val, token ids ending with eos, UTF-8 bytes) of each document."""
        documents = split_documents(source, self.plan["text_column"], self.plan["val_fraction"], self.plan["split_seed"])
        for batch in _batches(documents, _BATCH_DOCS):
            encoded = tokenizer.encode_batch([text for _, text, _ in batch])
            for (is_val, _, n_bytes), ids in zip(batch, encoded):
                ids.append(eos)
                yield is_val, np.asarray(ids, dtype=np.uint32), n_bytes


def fault_point(source_index: int, n_docs_written: int) -> None:
    """Tests: LMTRAIN_PREPARE_FAULT=kill:<input index> SIGKILLs the task writing that input file once its .tmp
    train shard has a document (a task killed halfway)."""
    if n_docs_written and os.environ.get("LMTRAIN_PREPARE_FAULT") == f"kill:{source_index}":
        os.kill(os.getpid(), signal.SIGKILL)
