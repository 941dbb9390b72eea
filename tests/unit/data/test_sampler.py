"""The window order is a pure function of (seed, epoch); ranks are disjoint and together read
every window once per epoch; a resumed stream continues with exactly the next batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmtrain.data.sampler import TrainWindowStream, ValSubset, WindowOrder, WindowSampler, count_windows
from lmtrain.data.shards import TokenSpace

SEQ = 8


@pytest.fixture
def token_file(tmp_path):
    tokens = np.arange(SEQ * 40 + 1, dtype=np.uint16)  # 40 windows; token value = position
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    return path, len(tokens)


def stream(path, n, *, rank=0, world=1, micro=2, start=0, seed=7):
    sampler = WindowSampler(TokenSpace.single(path, n, "uint16"), SEQ, seed)
    return TrainWindowStream(sampler, micro_batch_size=micro, rank=rank, world_size=world, start_sample=start)


def first_tokens(batches):
    return [int(row[0]) // SEQ for batch in batches for row in batch]  # window index of each row


def test_windows_overlap_by_one_token(token_file):
    path, n = token_file
    batch = next(iter(stream(path, n)))
    assert batch.shape == (2, SEQ + 1) and batch.dtype == torch.int64
    for row in batch:
        assert torch.equal(row, torch.arange(row[0], row[0] + SEQ + 1))  # contiguous, seq_len + 1


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = WindowOrder(40, seed=3), WindowOrder(40, seed=3)
    assert [a.window(g) for g in range(120)] == [b.window(g) for g in reversed(range(120))][::-1]
    assert sorted(a.window(g) for g in range(40)) == list(range(40))  # each epoch a permutation
    assert [a.window(g) for g in range(40)] != [a.window(g) for g in range(40, 80)]  # reshuffled per epoch
    assert [a.window(g) for g in range(40)] != [WindowOrder(40, seed=4).window(g) for g in range(40)]


def test_ranks_are_disjoint_and_cover_every_window_once_per_epoch(token_file):
    path, n = token_file
    world, micro = 2, 2
    per_rank = [first_tokens(itertools.islice(stream(path, n, rank=r, world=world, micro=micro), 10)) for r in range(world)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))


def test_world_size_change_consumes_the_same_samples_per_step(token_file):
    path, n = token_file
    global_batch = 4
    one = first_tokens(itertools.islice(stream(path, n, world=1, micro=4), 5))
    two = [first_tokens(itertools.islice(stream(path, n, rank=r, world=2, micro=2), 5)) for r in range(2)]
    for step in range(5):
        span = slice(step * global_batch, (step + 1) * global_batch)
        two_step = two[0][step * 2:(step + 1) * 2] + two[1][step * 2:(step + 1) * 2]
        assert sorted(one[span]) == sorted(two_step)


def test_resume_continues_with_the_next_batch(token_file):
    path, n = token_file
    full = list(itertools.islice(stream(path, n, world=2, rank=1), 30))
    resumed = list(itertools.islice(stream(path, n, world=2, rank=1, start=2 * 2 * 12), 18))
    assert all(torch.equal(a, b) for a, b in zip(full[12:], resumed))


def test_loader_workers_do_not_change_the_order(token_file):
    path, n = token_file
    ds = stream(path, n)
    plain = list(itertools.islice(iter(torch.utils.data.DataLoader(ds, batch_size=None)), 12))
    workers = list(itertools.islice(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)), 12))
    assert all(torch.equal(a, b) for a, b in zip(plain, workers))


def test_misaligned_resume_position_is_refused(token_file):
    path, n = token_file
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size x world_size = 4"):
        stream(path, n, world=2, micro=2, start=6)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_val_subset_is_the_same_for_any_number_of_ranks(token_file, world):
    """The first windows of each source, dealt round-robin; ranks short of items get fillers
    (source -1) so all run as many batches, and together they score exactly the subset."""
    path, n = token_file
    spaces = [TokenSpace.single(path, n, "uint16")] * 2
    ranks = [ValSubset(spaces, [5, 3], seq_len=SEQ, rank=r, world_size=world) for r in range(world)]
    assert len({len(ds) for ds in ranks}) == 1
    items = [ds[i] for ds in ranks for i in range(len(ds))]
    scored = sorted((item["source"], int(item["ids"][0]) // SEQ, item["index"]) for item in items if item["source"] >= 0)
    assert scored == [(0, w, w) for w in range(5)] + [(1, w, 5 + w) for w in range(3)]
    assert sum(item["source"] < 0 for item in items) == len(ranks[0]) * world - 8
    assert count_windows(SEQ, SEQ) == 0 and count_windows(SEQ + 1, SEQ) == 1
