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

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lmtrain.data.shards import TokenSpace


def count_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def read_window(tokens: TokenSpace, window: int, seq_len: int) -> np.ndarray:
    return tokens.read(window * seq_len, seq_len + 1)


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


class WindowSampler:
    """Global sample index -> window tokens of one token space: window perm_epoch[g % n]."""

    def __init__(self, tokens: TokenSpace, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.order = WindowOrder(count_windows(len(tokens), seq_len), seed)

    def sample(self, global_index: int) -> np.ndarray:
        return read_window(self.tokens, self.order.window(global_index), self.seq_len)


class TrainWindowStream(IterableDataset):
    """Endless micro batches (micro_batch_size, seq_len + 1) int64 for one data-parallel rank.

    `sampler.sample(g)` gives the tokens of global sample g (a `WindowSampler`, or a mixture's).
    With DataLoader workers, worker w produces micro batches w, w + W, ...; the DataLoader
    interleaves workers round-robin, so the order is the same for any number of workers.
    """

    def __init__(self, sampler, *, micro_batch_size: int, rank: int, world_size: int, start_sample: int) -> None:
        chunk = micro_batch_size * world_size
        if start_sample % chunk:
            raise ValueError(
                f"data position {start_sample} is not a multiple of micro_batch_size x world_size = {chunk}; "
                "resume needs a global batch that the new micro batch and world size divide"
            )
        self.sampler = sampler
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.start_chunk = start_sample // chunk

    def micro_batch_indices(self, chunk_index: int) -> range:
        """Global sample indices of this rank's micro batch in chunk `chunk_index`."""
        first = chunk_index * self.micro_batch_size * self.world_size + self.rank * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for chunk_index in itertools.count(self.start_chunk + worker, n_workers):
            rows = [self.sampler.sample(g) for g in self.micro_batch_indices(chunk_index)]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)


class ValWindows(Dataset):
    """The first `n_windows` windows of a val token space, in order, on one process (`lmtrain eval`)."""

    def __init__(self, tokens: TokenSpace, *, seq_len: int, n_windows: int):
        self.tokens, self.seq_len, self.n_windows = tokens, seq_len, n_windows

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(read_window(self.tokens, i, self.seq_len).astype(np.int64))


class ValSubset(Dataset):
    """One rank's share of the validation subset during training: items {"ids": (T + 1,), "source": s,
    "index": i}. The subset is the first n_s windows of each source's val split, the same for every
    number of ranks; item i of the list goes to rank i % W, and shorter shares are topped up with
    filler items (source -1, index -1) that are scored as nothing, so every rank runs as many batches."""

    def __init__(self, sources: list[TokenSpace], n_windows: list[int], *, seq_len: int, rank: int, world_size: int):
        self.sources, self.seq_len = sources, seq_len
        items = [(s, w) for s, n in enumerate(n_windows) for w in range(n)]
        per_rank = -(-len(items) // world_size)
        self.items = [(i, *items[i]) if i < len(items) else (-1, 0, 0)
                      for i in (rank + k * world_size for k in range(per_rank))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        index, source, window = self.items[k]
        ids = torch.from_numpy(read_window(self.sources[source], window, self.seq_len).astype(np.int64))
        return {"ids": ids, "source": source if index >= 0 else -1, "index": index}


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


def val_windows(tokens: TokenSpace, seq_len: int, val_batches: int | None, micro: int) -> ValWindows:
    """The first val_batches x micro windows of a prepared val split (all when None), on one process."""
    available = count_windows(len(tokens), seq_len)
    n_windows = available if val_batches is None else min(available, val_batches * micro)
    return ValWindows(tokens, seq_len=seq_len, n_windows=n_windows)
