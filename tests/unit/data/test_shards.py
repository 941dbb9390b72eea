"""A split stored as many shards reads as one token sequence, with 64-bit addressing (a split can
hold more than 2**32 tokens), and a shard is written whole or not at all."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lmtrain.data.sampler import WindowSampler, read_window
from lmtrain.data.shards import Shard, TokenSpace, check_shard, document_ends, index_path, write_shard


def test_shards_read_as_one_sequence_across_boundaries(tmp_path):
    sizes = [5, 1, 0, 7, 3]
    start, shards = 0, []
    for i, n in enumerate(sizes):
        path = tmp_path / f"{i}.bin"
        np.arange(start, start + n, dtype=np.uint32).tofile(path)
        shards.append(Shard(path, n))
        start += n
    space = TokenSpace(shards, "uint32")
    assert len(space) == sum(sizes)
    for a in range(len(space)):
        for n in (1, 2, 4, 9, 30):
            assert space.read(a, n).tolist() == list(range(a, min(a + n, len(space))))
    assert np.asarray(space).tolist() == list(range(len(space)))
    assert space[3:12].tolist() == list(range(3, 12))
    clone = pickle.loads(pickle.dumps(space))  # DataLoader workers get a copy, without open memmaps
    assert clone.read(4, 3).tolist() == [4, 5, 6]


def test_more_than_2_pow_32_tokens_are_addressed_exactly(tmp_path):
    """Three sparse shards of 1.5 * 2**31 uint16 tokens (12 GiB apparent, a few KB on disk): markers
    written at offsets beyond 2**32 are found by the token space and by the window sampler."""
    n = 3 * 2**30
    marks = {}
    shards = []
    for i in range(3):
        path = tmp_path / f"{i:06d}.bin"
        with open(path, "wb") as f:
            f.truncate(n * 2)
            for local in (0, n - 3, n // 2):
                f.seek(local * 2)
                value = (i * 7 + local) % 65000 + 1
                f.write(np.array([value, value + 1, value + 2], dtype=np.uint16).tobytes())
                marks[i * n + local] = [value, value + 1, value + 2]
        shards.append(Shard(path, n))
    space = TokenSpace(shards, "uint16")
    assert len(space) == 3 * n > 2**33
    for offset, values in marks.items():
        assert space.read(offset, 3).tolist() == values, offset
    crossing = 2 * n - 3  # the last 3 tokens of shard 1 and the first 3 of shard 2
    assert space.read(crossing, 6).tolist() == marks[crossing] + marks[2 * n]
    seq = 1024
    window = (2 * n + n // 2) // seq  # a window past 2**32 tokens
    tokens = read_window(space, window, seq)
    assert len(tokens) == seq + 1 and tokens.dtype == np.uint16
    assert np.array_equal(tokens, space.read(window * seq, seq + 1))
    sampler = WindowSampler(space, seq, seed=3)
    assert sampler.order.n_windows == (3 * n - 1) // seq
    g = next(g for g in range(sampler.order.n_windows) if sampler.order.window(g) * seq > 2**32)
    assert np.array_equal(sampler.sample(g), space.read(sampler.order.window(g) * seq, seq + 1))


def test_write_shard_is_whole_or_absent(tmp_path):
    docs = [np.array([5, 6, 0]), np.array([7, 0]), np.array([0])]
    entry = write_shard(tmp_path / "train" / "000000.bin", docs, "uint16")
    assert entry == {"n_tokens": 6, "n_docs": 3, "max_token_id": 7}
    full = {"file": "train/000000.bin", **entry}
    assert check_shard(tmp_path, full, "uint16") is None
    assert document_ends(tmp_path, full).tolist() == [3, 5, 6]
    assert not list((tmp_path / "train").glob("*.tmp"))

    def failing():
        yield np.array([1, 0])
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "train" / "000001.bin", failing(), "uint16")
    assert not (tmp_path / "train" / "000001.bin").exists() and not index_path(tmp_path / "train" / "000001.bin").exists()
    assert "missing" in check_shard(tmp_path, {"file": "train/000001.bin", "n_tokens": 2, "n_docs": 1}, "uint16")
    (tmp_path / "train" / "000000.bin").write_bytes(b"\0\0")
    assert "holds 2 bytes" in check_shard(tmp_path, full, "uint16")
