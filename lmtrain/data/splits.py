"""The train/val split of `lmtrain prepare`: which documents of the source(s) land in which split.

Val is either the documents of data.val_paths / data.hub_val_split, whole, or a seeded
data.val_fraction of the train source's documents, held out by `compute_split`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, List, Tuple

import numpy as np

from lmtrain.data.config import DataConfig, SourceKind
from lmtrain.data.sources import describe_source, explicit_val_source, load_documents

if TYPE_CHECKING:
    import datasets


_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / phi: spreads consecutive seeds apart


def _mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on uint64: a bijection that scatters neighbouring integers."""
    keys ^= keys >> np.uint64(30)
    keys *= np.uint64(0xBF58476D1CE4E5B9)
    keys ^= keys >> np.uint64(27)
    keys *= np.uint64(0x94D049BB133111EB)
    keys ^= keys >> np.uint64(31)
    return keys


def compute_split(n_docs: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Document positions (sorted, int64) of the train and val splits.

    Documents are ordered by a keyed hash of (seed, position) and the first ceil(n * val_fraction)
    go to val: a pure function of its arguments, independent of numpy's RNG streams and num_proc.
    """
    offset = np.uint64((seed * _GOLDEN) % 2**64)
    keys = _mix64(np.arange(n_docs, dtype=np.uint64) + offset)
    order = np.argsort(keys, kind="stable")
    n_val = math.ceil(n_docs * val_fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def compute_document_is_val(input_index: int, doc_indices: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Whether each document goes to val (bool array), decided for each document on its own by a keyed hash
    of (seed, input_index, doc_index) against val_fraction: what a sharded prepare uses, so that any task
    decides any document alike (on average val_fraction of them go to val, not exactly ceil(n * val_fraction))."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([(seed * _GOLDEN + input_index) % 2**64], dtype=np.uint64))[0]
        keys = _mix64(np.asarray(doc_indices, dtype=np.uint64) * np.uint64(_GOLDEN) + key)
    # The top 53 bits as a float in [0, 1).
    return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


def more_documents_hint(data: DataConfig, n_documents: int) -> str:
    finer = {"document": "data.text_unit=paragraph (blank-line separated) or line", "paragraph": "data.text_unit=line"}
    unit = getattr(data.text_unit, "name", None)
    if data.source is SourceKind.text and unit in finer:
        return f"cut the text into more documents with {finer[unit]}, or give more text"
    if n_documents < 2:
        return "the corpus is one document: give more text (more files, lines or rows)"
    return "give more documents, or change data.val_fraction"


def describe_sources(data: DataConfig) -> str:
    val_source = explicit_val_source(data)
    return describe_source(data) if val_source is None else f"{describe_source(data)}; val: {describe_source(val_source)}"


def load_splits(
    data: DataConfig, scratch: Path, log
) -> Tuple[datasets.Dataset, datasets.Dataset, np.ndarray, np.ndarray]:
    """(train documents, val documents, UTF-8 bytes of each train document, of each val document).

    Val is data.val_paths / data.hub_val_split whole when set, else data.val_fraction held out of the
    train source. Blank documents are dropped (unless data.keep_empty_documents); data.max_documents
    limits the train source."""
    documents = load_documents(data, scratch)
    kept, n_bytes, n_dropped = _kept_documents(documents, data, describe_source(data))
    if data.max_documents is not None:
        kept = kept[: data.max_documents]
    val_source = explicit_val_source(data)
    if val_source is None:
        train_idx, val_idx = _split_documents(kept, data)
        log(f"prepare: {len(kept)} documents ({n_dropped} empty dropped): {len(train_idx)} train, {len(val_idx)} val")
        train_bytes, val_bytes = n_bytes[train_idx], n_bytes[val_idx]
        return _select(documents, train_idx), _select(documents, val_idx), train_bytes, val_bytes
    log(f"prepare: loading the val documents, {describe_source(val_source)}")
    val_documents = load_documents(val_source, scratch)
    val_kept, val_n_bytes, val_dropped = _kept_documents(val_documents, val_source, describe_source(val_source))
    log(f"prepare: {len(kept)} train documents ({n_dropped} empty dropped), {len(val_kept)} val documents "
        f"({val_dropped} empty dropped); data.val_fraction is unused")
    return _select(documents, kept), _select(val_documents, val_kept), n_bytes[kept], val_n_bytes[val_kept]


def _select(documents: datasets.Dataset, rows: np.ndarray) -> datasets.Dataset:
    return documents.select(rows, keep_in_memory=True)


def _split_documents(kept: np.ndarray, data: DataConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and val documents: data.val_fraction of `kept` held out."""
    train_pos, val_pos = compute_split(len(kept), data.val_fraction, data.split_seed)
    if len(train_pos) == 0 or len(val_pos) == 0:
        empty = "train" if len(train_pos) == 0 else "val"
        raise ValueError(
            f"the {empty} split is empty: {len(kept)} document(s) with data.val_fraction={data.val_fraction} give "
            f"{len(train_pos)} train and {len(val_pos)} val (the split is by document); {more_documents_hint(data, len(kept))}"
        )
    return kept[train_pos], kept[val_pos]


def _kept_documents(documents: datasets.Dataset, data: DataConfig, description: str) -> Tuple[np.ndarray, np.ndarray, int]:
    """(row indices of the documents to keep, UTF-8 bytes of every row, number of rows dropped).

    A blank document (empty or whitespace only) is dropped, or with data.keep_empty_documents kept
    as an empty one (0 bytes: it packs to a lone eos). Raises when no document has text."""
    import pyarrow.compute as pc

    kept: List[np.ndarray] = []
    n_bytes: List[np.ndarray] = []
    start, n_with_text = 0, 0
    for table in documents.with_format("arrow").iter(batch_size=100_000):
        texts = table.column("text")
        nonblank = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0).fill_null(False)
        lengths = pc.if_else(nonblank, pc.binary_length(texts), 0).fill_null(0)
        n_bytes.append(lengths.to_numpy(zero_copy_only=False).astype(np.int64))
        keep = pc.is_valid(texts) if data.keep_empty_documents else nonblank
        kept.append(np.flatnonzero(keep.to_numpy(zero_copy_only=False)) + start)
        n_with_text += pc.sum(nonblank).as_py() or 0
        start += table.num_rows
    if n_with_text == 0:
        raise ValueError(
            f"the corpus {description} has no non-empty document ({len(documents)} read, all empty); "
            "check data.paths / data.val_paths / data.hub_name / data.text_column"
        )
    empty = np.zeros(0, dtype=np.int64)
    kept_rows = np.concatenate(kept or [empty])
    return kept_rows, np.concatenate(n_bytes or [empty]), len(documents) - len(kept_rows)
