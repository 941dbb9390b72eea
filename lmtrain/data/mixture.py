"""Weighted mixtures of prepared datasets: global sample index -> (source, window), deterministically.

Samples are drawn in blocks of `BLOCK` global samples. Each block holds exactly `counts[s]`
samples of source s (the weights rounded by largest remainder, so the realized proportions are
the weights to within 1/BLOCK in every block), in a seeded order that differs per block. The k-th
sample of source s in the whole stream is window `perm_s,epoch[k % n_s]` of that source, its own
seeded permutation per epoch: a source whose weight asks for more than it holds repeats, epoch
after epoch, and a large one is read without repetition.

Everything is a pure function of (seed, sources, weights, global index), so the guarantees of the
single-dataset stream carry over: a resume only needs the number of global samples consumed, and
any number of ranks reads the same samples per step.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import torch

from lmtrain.data.sampler import WindowOrder, read_window
from lmtrain.data.shards import TokenSpace

BLOCK = 4096


def block_counts(weights: Sequence[float], names: Sequence[str], block: int = BLOCK) -> list[int]:
    """Samples of each source per block of `block`: weights normalized, rounded by largest remainder."""
    total = float(sum(weights))
    exact = [w / total * block for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (exact[s] - counts[s], -s), reverse=True)
    for s in by_remainder[: block - sum(counts)]:
        counts[s] += 1
    for name, weight, count in zip(names, weights, counts):
        if count == 0:
            raise ValueError(
                f"data.sources: {name} has weight {weight}, {weight / total:.2e} of the total, too small to be drawn "
                f"(less than one sample in {block}); raise its weight to at least {total / block:.3g} or remove it"
            )
    return counts


class MixtureSampler:
    """`sample(g)`: the tokens (seq_len + 1) of global sample g of a weighted mixture."""

    def __init__(self, sources: Sequence[TokenSpace], n_windows: Sequence[int], weights: Sequence[float],
                 names: Sequence[str], *, seq_len: int, seed: int) -> None:
        self.sources, self.seq_len, self.seed = list(sources), seq_len, seed
        self.counts = block_counts(weights, names)
        # Seeded by name, not position: reordering data.sources does not reshuffle a source's windows.
        self.orders = [WindowOrder(n, seed * 1_000_003 + zlib.crc32(name.encode())) for n, name in zip(n_windows, names)]
        self._pattern = np.repeat(np.arange(len(self.counts)), self.counts)
        self._block = -1
        self._source: np.ndarray | None = None
        self._rank: np.ndarray | None = None

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position of block b, its rank among that source's positions in the block)."""
        if b != self._block:
            g = torch.Generator().manual_seed(self.seed * 7_919 + b)
            source = self._pattern[torch.randperm(BLOCK, generator=g).numpy()]
            rank = np.empty(BLOCK, dtype=np.int64)
            for s in range(len(self.counts)):
                where = np.flatnonzero(source == s)
                rank[where] = np.arange(len(where))
            self._block, self._source, self._rank = b, source, rank
        return self._source, self._rank

    def locate(self, global_index: int) -> tuple[int, int]:
        """(source, window) of global sample `global_index`."""
        b, i = divmod(global_index, BLOCK)
        source, rank = self.block(b)
        s = int(source[i])
        return s, self.orders[s].window(b * self.counts[s] + int(rank[i]))

    def sample(self, global_index: int) -> np.ndarray:
        s, window = self.locate(global_index)
        return read_window(self.sources[s], window, self.seq_len)

    def epochs(self, n_samples: int) -> list[float]:
        """How many times each source is read through by the first n_samples global samples."""
        return [n_samples * count / BLOCK / order.n_windows for count, order in zip(self.counts, self.orders)]
