"""The inspection path (lmtrain.inspection): it reports the attention the model really applied,
leaves the model's output untouched, and its logit lens ends at the model's own prediction."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.data.tokenizers import ByteTokenizer
from lmtrain.inspection import (Capture, causal_surprisal, eager_blocks, inspect_text, integrated_gradients, logit_lens,
                                masked_surprisal)
from lmtrain.model import ModelConfig, build_model
from lmtrain.tasks.config import TaskKind

SHAPES = {
    "gqa_rope_prenorm": dict(n_heads=4, n_kv_heads=2),
    "seed_transformer": dict(n_heads=2, positional="sinusoidal", norm="layernorm", mlp="relu", tied_embeddings=False,
                             bias=True, pre_norm=False, embedding_scale=True),
    "encoder": dict(n_heads=4, causal=False),
}


def model(peaked: bool = True, **kw):
    """A random model whose attention is peaked, as a trained one's is (at init every row is near uniform,
    which would hide a wrong scale or mask)."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=262, d_model=32, n_layers=3, d_ff=64, max_seq_len=48, **kw)).eval()
    with torch.no_grad():
        for block in m.blocks:
            block.attn.qkv.weight.mul_(25.0 if peaked else 1.0)
    return m


def ids(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_capture_leaves_logits_bitwise_and_reports_the_applied_attention(shape):
    m, x = model(**SHAPES[shape]), ids()
    with torch.no_grad():
        plain = m(x)
        with Capture(m) as capture:
            seen = m(x)
        attention = capture.attention()
    assert torch.equal(plain, seen)
    assert len(attention) == 3 and attention[0].shape == (2, m.cfg.n_heads, 20, 20)
    for layer, weights in enumerate(attention):
        assert torch.allclose(weights.sum(-1), torch.ones(2, m.cfg.n_heads, 20), atol=1e-5)
        assert weights.max() > 0.5  # peaked, so the checks below see a wrong scale or mask
        upper = weights.triu(diagonal=1)
        if m.cfg.causal:
            assert torch.count_nonzero(upper) == 0  # nothing attends to a later token
        else:
            assert upper.sum() > 1.0  # an encoder reads both ways
        # These weights are the ones SDPA applied: weights @ v through out_proj gives the attention's output.
        attn = capture.blocks[layer].attn
        v = capture.values(layer).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        rebuilt = attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 20, -1))
        assert torch.allclose(rebuilt, capture.attn_out[layer], atol=1e-5), (layer, (rebuilt - capture.attn_out[layer]).abs().max())


def test_padding_keys_get_no_attention_in_an_encoder():
    m, x = model(**SHAPES["encoder"]), ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 15:] = False
    with torch.no_grad(), Capture(m) as capture:
        m(x, attention_mask=mask)
    for weights in capture.attention():
        assert torch.count_nonzero(weights[0, :, :, 15:]) == 0
        assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-5)


@pytest.mark.parametrize("shape", ["gqa_rope_prenorm", "seed_transformer"])
def test_logit_lens_last_layer_is_the_models_prediction(shape):
    m, x = model(**SHAPES[shape]), ids()
    with torch.no_grad(), Capture(m) as capture:
        logits = m(x)
    lens_ids, lens_probs = logit_lens(m, capture.residual)
    assert lens_ids.shape == (4, 20, 5)  # embeddings + 3 layers
    own = logits[0, :, :262].softmax(-1)
    assert torch.equal(lens_ids[-1, :, 0], own.argmax(-1))
    assert torch.allclose(lens_probs[-1], own.topk(5, dim=-1).values)
    assert not torch.equal(lens_ids[0], lens_ids[-1])  # earlier layers say something else


def test_causal_surprisal_is_the_per_token_loss():
    m, x = model(), ids()
    with torch.no_grad():
        logits = m(x)
    tokens = x[0].tolist()
    surprisal = causal_surprisal(logits[0, :, :262], tokens)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1, :262], x[0, 1:], reduction="none")
    assert surprisal[0] is None and torch.allclose(torch.tensor(surprisal[1:]), loss, atol=1e-5)


def test_masked_surprisal_masks_one_token_at_a_time():
    m = model(**SHAPES["encoder"])
    tokens = ids(8)[0].tolist()
    surprisal = masked_surprisal(m, tokens, mask_id=259, skip={tokens[0]})
    assert surprisal[0] is None
    for t in (3, 7):
        masked = torch.tensor([tokens])
        masked[0, t] = 259
        with torch.no_grad():
            expected = -m(masked)[0, t, :262].log_softmax(-1)[tokens[t]]
        assert surprisal[t] == pytest.approx(float(expected), abs=1e-5)


def test_integrated_gradients_are_complete():
    """Per token, and their sum is the output's change from the zero-embedding baseline."""
    m = model(peaked=False)  # smooth enough for 64 integration points
    head = torch.nn.Linear(32, 3)
    forward = lambda rows: head(m(rows, hidden=True)[:, -1])  # noqa: E731
    x = ids(12)[:1]
    attributions, delta = integrated_gradients(m, forward, x, target=1, steps=64)
    assert len(attributions) == 12
    spread = sum(abs(a) for a in attributions)
    assert spread > 0 and abs(delta) < 0.05 * spread, (delta, spread)
    # No parameter got a gradient: inspection never touches training state.
    assert all(p.grad is None for p in [*m.parameters(), *head.parameters()])


class _LM(torch.nn.Module):
    """What inspect_text reads of a task: `.model`."""

    def __init__(self, m):
        super().__init__()
        self.model = m


def test_inspect_text_causal_views_and_their_shapes():
    m = model()
    result = inspect_text(_LM(m), TaskKind.causal_lm, ByteTokenizer(), "The cat sat.", seq_len=32)
    assert result.ids == [256, *b"The cat sat."] and result.tokens[:2] == ["<|endoftext|>", "T"]
    assert result.tokens[4] == "␣"  # whitespace stays visible as a label
    assert len(result.attention) == 3 and result.attention[0].shape == (4, 13, 13)
    assert result.lens_ids.shape == (4, 13, 5) and len(result.surprisal) == 13
    assert result.attributions is None and result.prediction is None


def test_inspect_text_refuses_a_text_beyond_the_context():
    with pytest.raises(ValueError, match=r"text is 61 tokens long but the model reads at most model.max_seq_len=48"):
        inspect_text(_LM(model()), TaskKind.causal_lm, ByteTokenizer(), "x" * 60, seq_len=32)
    with pytest.raises(ValueError, match="text is empty"):
        inspect_text(_LM(model()), TaskKind.causal_lm, ByteTokenizer(), "", seq_len=32)


def test_compiled_blocks_run_eagerly_while_inspected():
    m = model()
    for block in m.blocks:
        block.compile()
    with eager_blocks(m):
        assert all(block._compiled_call_impl is None for block in m.blocks)
        with torch.no_grad(), Capture(m) as capture:
            m(ids())
        assert len(capture.attention()) == 3
    assert all(block._compiled_call_impl is not None for block in m.blocks)


def test_views_are_pngs_of_the_documented_size(tmp_path):
    from PIL import Image

    from lmtrain.inspect_views import DPI, attention_size_in, bars_size_in, lens_size_in, write_views

    result = inspect_text(_LM(model()), TaskKind.causal_lm, ByteTokenizer(), "The cat sat on the mat.", seq_len=32)
    written = {p.name: p for p in write_views(result, ByteTokenizer(), tmp_path)}
    assert sorted(written) == ["attention.png", "attention_mean.png", "inspect.json", "logit_lens.png", "surprisal.png"]
    expected = {"attention.png": attention_size_in(3, 4), "logit_lens.png": lens_size_in(3, 24),
                "surprisal.png": bars_size_in(24)}
    for name, (width, height) in expected.items():
        with Image.open(written[name]) as image:
            assert image.format == "PNG" and image.size == (round(width * DPI), round(height * DPI)), name
    assert attention_size_in(3, 4) == (4 * 1.8 + 1.0, 3 * 1.8 + 1.0)
    assert max(attention_size_in(48, 64)) <= 60.0  # a big model's grid stays a drawable picture
    import json

    data = json.loads(written["inspect.json"].read_text())
    assert data["tokens"] == result.tokens and len(data["attention"]) == 3
    assert math.isclose(sum(data["attention"][2][1][5]), 1.0, abs_tol=1e-4)
    assert [layer[0]["ids"][0] for layer in data["logit_lens"][-1:]] == [int(result.predicted_ids[0])]


def test_inspect_text_of_a_qa_model_shows_attention_and_says_what_it_leaves_out():
    result = inspect_text(_LM(model(**SHAPES["encoder"])), TaskKind.qa, ByteTokenizer(), "who has it?", seq_len=32)
    assert len(result.attention) == 3 and result.attention[0].shape == (4, 11, 11)
    assert result.lens_ids is None and result.surprisal is None and result.attributions is None
    assert result.notes == ["logit lens and surprisal left out: a qa model's output is its task head, not the vocabulary"]
