"""KV-cache generation: matches full forwards, never samples padding ids, stops at eos."""

import pytest
import torch

from lmtrain.model import ModelConfig, Norm, Positional, Transformer, build_model
from lmtrain.model.generate import filter_top_k, filter_top_p

torch.set_num_threads(1)


def tiny_model(**overrides) -> Transformer:
    fields = dict(
        vocab_size=50, pad_vocab_multiple=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24
    )
    torch.manual_seed(1)  # a model whose greedy continuations are not one repeated token
    return build_model(ModelConfig(**(fields | overrides)))


def greedy_without_cache(model: Transformer, idx: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(idx)[:, -1, : model.cfg.vocab_size]
        idx = torch.cat((idx, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("positional", list(Positional), ids=lambda p: p.name)
def test_cached_greedy_equals_full_forward_argmax(positional):
    # float64 so that near-ties between logits cannot flip an argmax between the two paths
    model = tiny_model(positional=positional, init_std=0.2).double().eval()
    prompt = torch.randint(0, 50, (3, 5))
    generated = model.generate(prompt, 15, temperature=0.0)
    assert generated.shape == (3, 20)
    assert torch.equal(generated[:, :5], prompt)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 15))
    assert len(set(generated[:, 5:].flatten().tolist())) > 1  # not a degenerate constant output


def padded_model() -> Transformer:
    """vocab 70 padded to 128 rows, with a layernorm bias and an untied head for `rig_padding_logits`."""
    return tiny_model(
        vocab_size=70, pad_vocab_multiple=64, norm=Norm.layernorm, bias=True, tied_embeddings=False
    )


def rig_padding_logits(model: Transformer) -> None:
    """Make every padding id (>= vocab_size) outscore every real id, whatever the input."""
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)  # final hidden state is all ones
        model.lm_head.weight.zero_()
        model.lm_head.weight[model.cfg.vocab_size :] = 100.0


def test_padding_ids_are_never_sampled():
    model = padded_model()
    assert model.lm_head.weight.shape[0] == 128
    rig_padding_logits(model)
    prompt = torch.randint(0, 70, (4, 3))
    assert model(prompt)[:, -1].argmax(dim=-1).min() >= 70  # the rig works: padding wins unmasked
    generator = torch.Generator().manual_seed(0)
    settings = [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 5.0, "top_k": 100}]
    for kwargs in settings + [{"top_p": 0.99}]:
        out = model.generate(prompt, 20, generator=generator, **kwargs)
        assert out.max() < 70, kwargs


def first_index(row: torch.Tensor, token: int) -> int:
    return (row == token).nonzero()[0].item()


def test_eos_stops_when_every_row_finished_and_finished_rows_keep_eos():
    model = tiny_model(init_std=0.2).double().eval()
    prompt = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(13))
    free = model.generate(prompt, 16, temperature=0.0)[:, 4:]
    eos_id = free[0, 3].item()
    stop_0, stop_1 = first_index(free[0], eos_id), first_index(free[1], eos_id)
    # The scenario this test needs: row 0 finishes first and would then emit something else.
    assert stop_0 < stop_1 < 15 and torch.any(free[0, stop_0:stop_1 + 1] != eos_id), free

    out = model.generate(prompt, 16, temperature=0.0, eos_id=eos_id)[:, 4:]
    assert out.shape[1] == stop_1 + 1
    assert torch.equal(out[0, : stop_0 + 1], free[0, : stop_0 + 1])
    assert torch.all(out[0, stop_0:] == eos_id)
    assert torch.equal(out[1], free[1, : stop_1 + 1])


def test_generation_stops_at_once_when_every_row_emits_eos():
    model = padded_model()
    rig_padding_logits(model)
    with torch.no_grad():
        model.lm_head.weight[5] = 50.0  # best real id is 5
    out = model.generate(torch.randint(0, 70, (3, 2)), 10, temperature=0.0, eos_id=5)
    assert out.shape == (3, 3)
    assert torch.all(out[:, -1] == 5)


def test_top_k_one_equals_greedy():
    model = tiny_model(init_std=0.2)
    prompt = torch.randint(0, 50, (3, 4))
    greedy = model.generate(prompt, 12, temperature=0.0)
    sampled = model.generate(prompt, 12, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, greedy)


def test_sampling_is_reproducible_with_generator_and_varies_without_top_k():
    model = tiny_model(init_std=0.2)
    prompt = torch.zeros(2, 1, dtype=torch.long)
    first = model.generate(prompt, 15, generator=torch.Generator().manual_seed(3))
    again = model.generate(prompt, 15, generator=torch.Generator().manual_seed(3))
    other = model.generate(prompt, 15, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_filter_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    kept = filter_top_k(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True]]


def test_filter_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    logits = probs.log()
    assert filter_top_p(logits, 0.5).isfinite().tolist() == [[False, True, False, False]]
    assert filter_top_p(logits, 0.75).isfinite().tolist() == [[False, True, True, False]]
    assert filter_top_p(logits, 1.0).isfinite().all()


def test_generate_restores_training_mode():
    model = tiny_model(dropout=0.5)
    model.train()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0.0)
    assert model.training
    model.eval()
    model.generate(torch.zeros(1, 2, dtype=torch.long), 3, temperature=0.0)
    assert not model.training


def test_generate_in_training_mode_uses_no_dropout():
    model = tiny_model(dropout=0.5, init_std=0.2).train()
    prompt = torch.randint(0, 50, (2, 3))
    first = model.generate(prompt, 10, temperature=0.0)
    assert torch.equal(first, model.generate(prompt, 10, temperature=0.0))


def test_too_long_generation_is_refused_with_numbers():
    model = tiny_model()
    expected = r"prompt of 20 tokens \+ max_new_tokens=5 exceeds model.max_seq_len=24"
    with pytest.raises(ValueError, match=expected):
        model.generate(torch.zeros(1, 20, dtype=torch.long), 5)
    assert model.generate(torch.zeros(1, 20, dtype=torch.long), 4, temperature=0.0).shape == (1, 24)
    with pytest.raises(ValueError, match="prompt of 30 tokens exceeds model.max_seq_len=24"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), -6)  # a budget computed as max_seq_len - prompt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": -1.0}, "temperature=-1.0"), ({"top_k": 0}, "top_k=0"), ({"top_p": 0.0}, "top_p=0.0")],
)
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().generate(torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)
