"""Masked-LM masking: BERT's proportions, specials never chosen, whole words chosen together,
and the same masks from the same RNG state (what makes resume exact)."""

from __future__ import annotations

import pytest
import torch

from lmtrain.data.tokenizers import ByteTokenizer
from lmtrain.tasks.config import TaskConfig
from lmtrain.tasks.masked_lm import IGNORE, VocabTables, mask_tokens, word_starts


@pytest.fixture(scope="module")
def vocab() -> VocabTables:
    tok = ByteTokenizer()
    return VocabTables(tok, 320, list(tok.special_token_ids().values()), mask_id=tok.special_token_ids()["<|mask|>"])


def masks(ids, vocab, seed=0, **cfg):
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, TaskConfig(kind="masked_lm", **cfg), mask_id=vocab.mask_id, special=vocab.special,
                       random_ids=vocab.random_ids, starts_space=vocab.starts_space, ends_space=vocab.ends_space, generator=g)


def test_bert_proportions_and_specials(vocab):
    ids = torch.randint(0, 256, (64, 512), generator=torch.Generator().manual_seed(1))
    ids[:, ::50] = 256  # eos: never chosen
    inputs, labels = masks(ids, vocab)
    chosen = labels != IGNORE
    assert chosen.float().mean().item() == pytest.approx(0.15 * 0.98, abs=0.01)
    assert not chosen[:, ::50].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    as_mask = (inputs == vocab.mask_id)[chosen].float().mean().item()
    kept = (inputs == ids)[chosen].float().mean().item()
    assert as_mask == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1 + 0.1 / 256, abs=0.02)
    replaced = inputs[chosen & (inputs != vocab.mask_id) & (inputs != ids)]
    assert not vocab.special[replaced].any()  # random replacements are ordinary tokens


def test_same_generator_same_masks(vocab):
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a, b) for a, b in zip(masks(ids, vocab, seed=5), masks(ids, vocab, seed=5)))
    assert not torch.equal(masks(ids, vocab, seed=5)[1], masks(ids, vocab, seed=6)[1])


def test_whole_words_are_masked_together(vocab):
    tok = ByteTokenizer()
    text = " ".join(["alpha", "beta", "gamma", "delta", "epsilon"] * 40)
    ids = torch.tensor([tok.encode(text)])
    starts = word_starts(ids, vocab.special, vocab.starts_space, vocab.ends_space)
    words = (starts.long().cumsum(1) - 1)[0]
    assert int(words[-1]) + 1 == 2 * 200 - 1  # 200 words and the 199 spaces between them
    _, labels = masks(ids, vocab, seed=3, whole_word_mask=True, mask_prob=0.3)
    chosen = (labels != IGNORE)[0]
    for w in range(int(words[-1]) + 1):
        in_word = chosen[words == w]
        assert in_word.all() or not in_word.any()
    assert 0.15 < chosen.float().mean() < 0.45
