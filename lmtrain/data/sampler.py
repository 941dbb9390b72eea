"""Exactly resumable window streams over a packed token file.

The training set is the sequence of windows of `seq_len + 1` tokens starting at multiples of
`seq_len` (neighbours share one token: the last target of one is the first input of the next).
The global sample order is a pure function of (seed, epoch): epoch e is a seeded permutation of
all windows. Global sample g is window perm_{g // n}[g % n]. Nothing else decides what is read,
so a resume only needs the number of global samples consumed.

Each optimizer step consumes `global_batch_size` consecutive global samples. They are dealt in
chunks of `micro_batch_size * world_size`; rank r takes the r-th micro batch of every chunk. A
changed world size at the same global batch therefore consumes the same samples per step.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def count_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def read_window(tokens: np.ndarray, window: int, seq_len: int) -> np.ndarray:
    start = window * seq_len
    return tokens[start : start + seq_len + 1]


class WindowOrder:
    """Maps a global sample index to a window index: perm_epoch[index % n]."""

    def __init__(self, n_windows: int, seed: int) -> None:
        if n_windows <= 0:
            raise ValueError("WindowOrder needs at least one window")
        self.n_windows = n_windows
        self.seed = seed
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n_windows, generator=g).numpy()
            self._epoch = epoch
        return self._perm

    def window(self, global_index: int) -> int:
        epoch, i = divmod(global_index, self.n_windows)
        return int(self.permutation(epoch)[i])


class TrainWindowStream(IterableDataset):
    """Endless micro batches (micro_batch_size, seq_len + 1) int64 for one data-parallel rank.

    With DataLoader workers, worker w produces micro batches w, w + W, ...; the DataLoader
    interleaves workers round-robin, so the order is the same for any number of workers.
    """

    def __init__(
        self,
        path: Path,
        *,
        dtype: str,
        n_tokens: int,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_sample: int,
    ) -> None:
        chunk = micro_batch_size * world_size
        if start_sample % chunk:
            raise ValueError(
                f"data position {start_sample} is not a multiple of micro_batch_size x world_size = {chunk}; "
                "resume needs a global batch that the new micro batch and world size divide"
            )
        self.path, self.dtype, self.n_tokens = Path(path), dtype, n_tokens
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_chunk = start_sample // chunk

    def micro_batch_indices(self, chunk_index: int) -> range:
        """Global sample indices of this rank's micro batch in chunk `chunk_index`."""
        first = chunk_index * self.micro_batch_size * self.world_size + self.rank * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # Opened in the worker: a memmap does not survive pickling into worker processes cheaply.
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        order = WindowOrder(count_windows(self.n_tokens, self.seq_len), self.seed)
        for chunk_index in itertools.count(self.start_chunk + worker, n_workers):
            rows = [read_window(tokens, order.window(g), self.seq_len) for g in self.micro_batch_indices(chunk_index)]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)


class ValWindows(Dataset):
    """A fixed validation subset: the first `n_windows` windows of the val split, in order,
    dealt round-robin to ranks so every rank evaluates the same number."""

    def __init__(self, path: Path, *, dtype: str, n_tokens: int, seq_len: int, n_windows: int, rank: int, world_size: int):
        self.path, self.dtype, self.n_tokens, self.seq_len = Path(path), dtype, n_tokens, seq_len
        self.windows = list(range(rank, n_windows, world_size))
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return torch.from_numpy(read_window(self._tokens, self.windows[i], self.seq_len).astype(np.int64))


class ExampleStream(IterableDataset):
    """Endless collated micro batches of in-memory examples for one rank, in the same global
    order scheme as `TrainWindowStream` (a seeded permutation of the items per epoch)."""

    def __init__(self, items: list, collate, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 start_sample: int) -> None:
        chunk = micro_batch_size * world_size
        if start_sample % chunk:
            raise ValueError(
                f"data position {start_sample} is not a multiple of micro_batch_size x world_size = {chunk}; "
                "resume needs a global batch that the new micro batch and world size divide"
            )
        self.items, self.collate = items, collate
        self.micro_batch_size, self.rank, self.world_size, self.seed = micro_batch_size, rank, world_size, seed
        self.start_chunk = start_sample // chunk

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        order = WindowOrder(len(self.items), self.seed)
        for chunk_index in itertools.count(self.start_chunk + worker, n_workers):
            first = chunk_index * self.micro_batch_size * self.world_size + self.rank * self.micro_batch_size
            yield self.collate([self.items[order.window(g)] for g in range(first, first + self.micro_batch_size)])


def val_shard(items: list[dict], rank: int, world_size: int) -> list[dict]:
    """Items rank, rank + W, ... each tagged with its index in `items`; shards shorter than the
    longest get filler copies (marked "filler") so every rank runs the same number of batches."""
    per_rank = -(-len(items) // world_size)
    shard = []
    for k in range(per_rank):
        i = rank + k * world_size
        if i < len(items):
            shard.append({**items[i], "index": i})
        else:
            shard.append({**items[0], "index": -1, "filler": True})
    return shard


def val_windows(data_dir: Path, meta, seq_len: int, val_batches: int | None, micro: int) -> ValWindows:
    """The first val_batches x micro windows of a prepared val split (all when None), on one process."""
    available = count_windows(meta.n_val_tokens, seq_len)
    n_windows = available if val_batches is None else min(available, val_batches * micro)
    return ValWindows(data_dir / "val.bin", dtype=meta.dtype, n_tokens=meta.n_val_tokens, seq_len=seq_len,
                      n_windows=n_windows, rank=0, world_size=1)
