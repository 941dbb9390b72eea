"""Token spaces: one split of a prepared dataset read as a single array of token ids, whatever
number of files it is stored in.

Layouts of a split (`DatasetMeta.shards` says which):
- single file (what `lmtrain prepare` writes on one machine): `<dir>/train.bin`, `<dir>/val.bin`;
- sharded (what a distributed prepare writes): `meta.shards = {"train": [shard, ...], "val": [...]}`,
  each shard `{"file": "train/000000.bin", "n_tokens": N, "n_docs": D, "inputs": [...]}` with
  - `<file>`: the shard's token ids (meta.dtype, native byte order, no header), documents back to
    back, each ending with eos;
  - `<file minus .bin>.idx`: uint64 little-endian, the end offset (exclusive, within the shard) of
    each document: D values, the last one N.
  Shards are concatenated in list order. Addresses are Python ints (64-bit and more), so a split
  can hold more than 2**32 tokens; each shard is memory-mapped on its own.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

INDEX_SUFFIX = ".idx"
INDEX_DTYPE = np.dtype("<u8")


@dataclass(frozen=True)
class Shard:
    path: Path
    n_tokens: int


def index_path(shard_path: str | Path) -> Path:
    return Path(shard_path).with_suffix(INDEX_SUFFIX)


class TokenSpace:
    """Read-only, picklable view of shards as one sequence: `len()`, `read(start, n)` and slicing.

    The memmaps are opened lazily in the process that reads (DataLoader workers included)."""

    def __init__(self, shards: Sequence[Shard], dtype: str) -> None:
        self.shards = [s for s in shards if s.n_tokens > 0]
        self.dtype = np.dtype(dtype)
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard.n_tokens)
        self._maps: list[np.memmap] | None = None

    @classmethod
    def single(cls, path: str | Path, n_tokens: int, dtype: str) -> "TokenSpace":
        return cls([Shard(Path(path), n_tokens)], dtype)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _map(self, i: int) -> np.memmap:
        if self._maps is None:
            self._maps = [None] * len(self.shards)  # type: ignore[list-item]
        if self._maps[i] is None:
            shard = self.shards[i]
            self._maps[i] = np.memmap(shard.path, dtype=self.dtype, mode="r", shape=(shard.n_tokens,))
        return self._maps[i]

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) (clipped to the end), copied across shard boundaries when needed."""
        stop = min(start + n, len(self))
        if start < 0 or start > len(self):
            raise IndexError(f"token offset {start} is outside a token space of {len(self)} tokens")
        i = bisect.bisect_right(self.starts, start) - 1
        parts = []
        while start < stop:
            local = start - self.starts[i]
            take = min(stop - start, self.shards[i].n_tokens - local)
            parts.append(self._map(i)[local : local + take])
            start += take
            i += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenSpace is read by contiguous slices, e.g. tokens[a:b]")
        start, stop, _ = key.indices(len(self))
        return self.read(start, max(0, stop - start))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole space in memory (small splits, tests); training reads windows with `read`."""
        whole = np.array(self.read(0, len(self)))
        return whole if dtype is None else whole.astype(dtype)

    def chunks(self, size: int = 1 << 24) -> Iterable[np.ndarray]:
        """The whole space in order, at most `size` tokens at a time (for statistics over a split)."""
        for start in range(0, len(self), size):
            yield self.read(start, size)


def write_shard(path: Path, documents: Iterable[Sequence[int] | np.ndarray], dtype: str) -> dict:
    """Write documents (each already ending with eos) as one shard and its index, atomically: both
    files appear under their names only when whole (written to `.tmp` names, fsynced, renamed; the
    index last, so a shard whose index exists is whole). Returns the shard's meta entry fields
    {"n_tokens", "n_docs", "max_token_id"}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = path.with_name(path.name + ".tmp")
    tmp_idx = path.with_name(index_path(path).name + ".tmp")
    ends: list[int] = []
    n_tokens, max_id = 0, 0
    with open(tmp_bin, "wb") as out:
        for ids in documents:
            ids = np.asarray(ids)
            if len(ids):
                max_id = max(max_id, int(ids.max()))
            out.write(ids.astype(dtype).tobytes())
            n_tokens += len(ids)
            ends.append(n_tokens)
        out.flush()
        os.fsync(out.fileno())
    with open(tmp_idx, "wb") as out:
        out.write(np.asarray(ends, dtype=INDEX_DTYPE).tobytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp_bin, path)
    os.replace(tmp_idx, index_path(path))
    return {"n_tokens": n_tokens, "n_docs": len(ends), "max_token_id": max_id}


def check_shard(directory: Path, entry: dict, dtype: str) -> str | None:
    """None when a shard listed in meta.json is whole on disk, else what is wrong with it."""
    path = directory / entry["file"]
    if not path.is_file():
        return f"shard {entry['file']} is missing"
    expected = entry["n_tokens"] * np.dtype(dtype).itemsize
    if path.stat().st_size != expected:
        return (f"shard {entry['file']} holds {path.stat().st_size} bytes but meta.json counts {entry['n_tokens']} "
                f"tokens of {dtype} ({expected} bytes)")
    idx = index_path(path)
    if not idx.is_file() or idx.stat().st_size != entry["n_docs"] * INDEX_DTYPE.itemsize:
        return f"the document index of shard {entry['file']} is missing or does not hold {entry['n_docs']} entries"
    return None


def document_ends(directory: Path, entry: dict) -> np.ndarray:
    """The end offsets (within the shard) of a shard's documents."""
    return np.fromfile(index_path(directory / entry["file"]), dtype=INDEX_DTYPE)
