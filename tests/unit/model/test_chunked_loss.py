"""trainer.loss_chunk_tokens: the training loss computed a chunk of positions at a time equals the
plain loss and its gradients (fp32 tolerance), and never holds more than one chunk's logits, in
forward or backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.model import ModelConfig, build_model

TINY = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, dropout=0.0)


def model_and_batch(**overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, **overrides}))
    batch = torch.randint(0, 300, (3, 18), generator=torch.Generator().manual_seed(1))
    return model, batch[:, :-1], batch[:, 1:]


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [{}, {"tied_embeddings": False}, {"positional": "learned", "norm": "layernorm",
                                                                         "mlp": "gelu", "bias": True}],
                         ids=["llama-tied", "untied", "gpt2"])
@pytest.mark.parametrize("chunk", [7, 16, 51, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_path(overrides, chunk):
    model, inputs, targets = model_and_batch(**overrides)
    plain = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    plain.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    chunked = model(inputs, targets=targets, loss_chunk=chunk)
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_no_more_than_one_chunk_of_logits_exists_in_forward_or_backward(monkeypatch):
    model, inputs, targets = model_and_batch()
    n_tokens, chunk = targets.numel(), 8
    rows = []
    compute_logits = type(model).compute_logits
    monkeypatch.setattr(type(model), "compute_logits", lambda self, h: rows.append(h.shape[0]) or compute_logits(self, h))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(inputs, targets=targets, loss_chunk=chunk)
    loss.backward()
    n_chunks = -(-n_tokens // chunk)
    assert len(rows) == 2 * n_chunks and max(rows) == chunk  # each chunk: once forward, once recomputed in backward
    assert max(saved) < n_tokens * model.cfg.padded_vocab_size  # nothing the size of the whole logits is kept
