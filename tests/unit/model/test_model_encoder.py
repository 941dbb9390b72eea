"""The bidirectional encoder (model.causal=false), key-padding masks, and translation decoding."""

from __future__ import annotations

import pytest
import torch

from lmtrain.model import ModelConfig, build_model
from lmtrain.model.decoding import beam_search, greedy_decode

from test_model_presets import load_preset


def model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, **kw)).eval()


def test_bert_base_parameter_count():
    with torch.device("meta"):
        from lmtrain.model import Transformer

        bert = Transformer(load_preset("bert_base"))
    # Exactly BertForMaskedLM's (transformers' count, tied decoder once): BertModel's 109,482,240
    # without its pooler (590,592), which BertForMaskedLM has not either, plus the masked-LM head:
    # transform dense (590,592) and LayerNorm (1,536), decoder bias (30,522; lmtrain's padding
    # entries of it not counted).
    assert bert.num_parameters() == 109_482_240 - 590_592 + 590_592 + 1_536 + 30_522 == 109_514_298
    assert not bert.cfg.causal and not bert.cfg.pre_norm


def test_bert_options_off_add_no_tensor_and_on_change_the_output():
    plain = model(causal=False, positional="learned", norm="layernorm", mlp="gelu", bias=True)
    assert not any(k.startswith(("type_", "embed_norm", "lm_head_transform")) or k == "lm_head.bias"
                   for k in plain.state_dict())
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(4))
    bert = model(causal=False, positional="learned", norm="layernorm", mlp="gelu_exact", bias=True, embedding_norm=True,
                 type_vocab_size=2, lm_head_transform=True, lm_head_bias=True)
    assert {"type_embeddings.weight", "embed_norm.weight", "lm_head_transform.dense.weight", "lm_head.bias"} <= set(
        bert.state_dict())
    with torch.no_grad():
        zeros = bert(ids, token_type_ids=torch.zeros_like(ids))
        assert torch.equal(bert(ids), zeros)  # no token_type_ids = type 0 everywhere
        assert not torch.allclose(bert(ids, token_type_ids=torch.ones_like(ids)), zeros)
        # task heads read the hidden states before the masked-LM transform
        assert torch.equal(bert.compute_logits(bert(ids, hidden=True)), zeros)
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        plain(ids, token_type_ids=torch.zeros_like(ids))


def test_gelu_exact_is_the_erf_form():
    from lmtrain.model.config import MLPKind
    from lmtrain.model.layers import activation

    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(activation(MLPKind.gelu_exact, x), 0.5 * x * (1 + torch.erf(x / 2**0.5)), atol=1e-6, rtol=0)
    assert (activation(MLPKind.gelu, x) - activation(MLPKind.gelu_exact, x)).abs().max() > 1e-4


def test_bert_option_errors_say_what_to_do():
    with pytest.raises(ValueError, match="lm_head_transform=true .* mlp=swiglu"):
        ModelConfig(mlp="swiglu", lm_head_transform=True)
    with pytest.raises(ValueError, match="type_vocab_size=-1"):
        ModelConfig(type_vocab_size=-1)


def test_encoder_sees_both_ways_decoder_only_back():
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50
    with torch.no_grad():
        for causal in (True, False):
            m = model(causal=causal)
            first = m(ids, hidden=True)[0, 0]
            assert torch.equal(first, m(changed, hidden=True)[0, 0]) == causal


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_padding_changes_nothing_for_real_tokens(positional):
    m = model(causal=False, positional=positional)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        padded = m(ids, attention_mask=mask, hidden=True)[1, :7]
        alone = m(ids[1:, :7], hidden=True)[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_encoder_does_not_generate():
    with pytest.raises(ValueError, match="bidirectional encoder .* cannot generate"):
        model(causal=False).generate(torch.zeros(1, 3, dtype=torch.long), 4)


def test_beam_search_finds_the_most_likely_finished_sequence():
    """Vocabulary 4, three new tokens, beam 32: every finished sequence is scored, so the beam's
    answer must be the exhaustive search's."""
    import itertools

    torch.manual_seed(0)
    m = build_model(ModelConfig(vocab_size=4, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16,
                                init_std=0.3)).eval()
    prompt, eos = [1, 2, 3], 0

    def log_prob(tokens: tuple) -> float:
        seq = torch.tensor([prompt + list(tokens) + [eos]])
        with torch.no_grad():
            logp = torch.log_softmax(m(seq[:, :-1])[0, :, :4], -1)
        return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate([*tokens, eos])))

    candidates = [c for n in range(3) for c in itertools.product([1, 2, 3], repeat=n)]
    best = max(candidates, key=log_prob)
    found = beam_search(m, prompt, 3, eos_id=eos, beam_size=32, length_penalty=0.0)
    assert log_prob(tuple(found)) == pytest.approx(log_prob(best)) and tuple(found) == best
    greedy = greedy_decode(m, prompt, 3, eos_id=eos)
    assert beam_search(m, prompt, 3, eos_id=eos, beam_size=1) == greedy
    assert greedy_decode(m, prompt, 3, eos_id=eos, fixed_steps=True) == greedy  # extra passes change nothing
