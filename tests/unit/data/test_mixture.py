"""A mixture maps each global sample to (source, window) as a pure function of the seed: the
realized proportions are the weights, a small source repeats epoch after epoch while a large one
does not, and the stream is the same whatever the number of ranks or where it resumed."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from lmtrain.data.mixture import BLOCK, MixtureSampler, block_counts
from lmtrain.data.sampler import TrainWindowStream
from lmtrain.data.shards import TokenSpace

SEQ = 4


@pytest.fixture
def spaces(tmp_path):
    """Three sources whose tokens say which source and window they come from (source * 10000 + position)."""
    out = []
    for s, n_windows in enumerate([50, 7, 400]):
        path = tmp_path / f"{s}.bin"
        (np.arange(n_windows * SEQ + 1, dtype=np.uint32) + s * 10_000).tofile(path)
        out.append(TokenSpace.single(path, n_windows * SEQ + 1, "uint32"))
    return out


def mixture(spaces, weights=(0.5, 0.2, 0.3), seed=11):
    return MixtureSampler(spaces, [50, 7, 400], list(weights), ["web", "code", "books"], seq_len=SEQ, seed=seed)


def test_realized_proportions_match_the_weights(spaces):
    sampler = mixture(spaces)
    n = 20 * BLOCK + 1234
    counts = Counter(sampler.locate(g)[0] for g in range(n))
    for s, weight in enumerate((0.5, 0.2, 0.3)):
        assert abs(counts[s] / n - weight) < 1 / BLOCK, (s, counts[s] / n)
    assert block_counts([0.5, 0.2, 0.3], ["a", "b", "c"]) == [2048, 819, 1229]  # largest remainder: sums to BLOCK
    assert sum(block_counts([1, 1, 1], ["a", "b", "c"])) == BLOCK


def test_small_source_repeats_each_window_equally_large_one_never(spaces):
    sampler = mixture(spaces)
    seen = {s: Counter() for s in range(3)}
    for g in range(2 * BLOCK):
        s, w = sampler.locate(g)
        seen[s][w] += 1
    code = seen[1]  # 7 windows, drawn ~1638 times: every window within one of the others
    assert sorted(code) == list(range(7)) and max(code.values()) - min(code.values()) <= 1
    books_draws = sum(seen[2].values())
    assert books_draws > 400 and sorted(seen[2]) == list(range(400))  # a whole epoch, and then more
    epochs = sampler.epochs(2 * BLOCK)
    assert epochs[1] == pytest.approx(code.total() / 7) and epochs[1] > 200


def test_samples_read_the_located_window(spaces):
    sampler = mixture(spaces)
    for g in range(0, 3000, 97):
        s, w = sampler.locate(g)
        assert sampler.sample(g).tolist() == [s * 10_000 + w * SEQ + i for i in range(SEQ + 1)]


def test_order_is_a_pure_function_of_the_seed_and_sources_keep_their_order_when_reordered(spaces):
    a, b = mixture(spaces), mixture(spaces)
    forward = [a.locate(g) for g in range(3 * BLOCK)]
    assert forward == [b.locate(g) for g in reversed(range(3 * BLOCK))][::-1]
    assert forward[:200] != [mixture(spaces, seed=12).locate(g) for g in range(200)]
    # Swapping the order of the sources keeps each source's own window order (seeded by its name).
    swapped = MixtureSampler([spaces[1], spaces[0], spaces[2]], [7, 50, 400], [0.2, 0.5, 0.3],
                             ["code", "web", "books"], seq_len=SEQ, seed=11)
    web_a = [w for s, w in forward if s == 0][:100]
    web_b = [w for s, w in (swapped.locate(g) for g in range(3 * BLOCK)) if s == 1][:100]
    assert web_a == web_b


def stream(sampler, *, rank=0, world=1, micro=2, start=0):
    return TrainWindowStream(sampler, micro_batch_size=micro, rank=rank, world_size=world, start_sample=start)


def test_ranks_read_disjoint_slices_and_world_size_and_resume_keep_the_samples(spaces):
    sampler = mixture(spaces)
    global_batch = 8
    one = list(itertools.islice(stream(sampler, micro=4), 2 * 10))  # 10 steps of 2 micro batches
    per_rank = [list(itertools.islice(stream(mixture(spaces), rank=r, world=2, micro=2), 2 * 10)) for r in range(2)]
    for step in range(10):
        expected = torch.cat(one[2 * step : 2 * step + 2])
        got = torch.cat([per_rank[r][2 * step + k] for k in range(2) for r in range(2)])
        assert sorted(map(tuple, expected.tolist())) == sorted(map(tuple, got.tolist()))
    resumed = list(itertools.islice(stream(mixture(spaces), micro=4, start=6 * global_batch), 8))
    assert all(torch.equal(x, y) for x, y in zip(resumed, one[12:]))


def test_a_weight_too_small_to_draw_is_refused():
    with pytest.raises(ValueError, match=r"data.sources: rare has weight 1e-05.*raise its weight to at least"):
        block_counts([1.0, 1e-5], ["common", "rare"])
