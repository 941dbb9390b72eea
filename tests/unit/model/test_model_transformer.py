"""Transformer forward: causality, shapes, positions, init, weight tying, errors."""

import itertools
import math

import pytest
import torch

from lmtrain.model import KVCache, MLPKind, ModelConfig, Norm, Positional, Transformer, build_model
from lmtrain.model.layers import MLP, apply_rope, compute_rope_cos_sin

torch.set_num_threads(1)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=50, pad_vocab_multiple=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=12
    )
    return ModelConfig(**(fields | overrides))


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return build_model(tiny_config(**overrides)).eval()


COMBINATIONS = list(itertools.product(Positional, Norm, MLPKind, (True, False)))


@pytest.mark.parametrize(
    ("positional", "norm", "mlp", "pre_norm"),
    COMBINATIONS,
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_causal(positional, norm, mlp, pre_norm):
    model = tiny_model(positional=positional, norm=norm, mlp=mlp, pre_norm=pre_norm, bias=True)
    idx = torch.randint(0, 50, (2, 10))
    logits = model(idx)
    for t in (0, 4, 8):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
        changed_logits = model(changed)
        torch.testing.assert_close(changed_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(changed_logits[:, t + 1], logits[:, t + 1])


def test_logits_shape_and_dtype():
    model = tiny_model()
    logits = model(torch.randint(0, 50, (3, 7)))
    assert logits.shape == (3, 7, 64)  # vocab 50 padded to a multiple of 16
    assert logits.dtype == torch.float32


def test_gqa_shapes():
    model = tiny_model(d_model=32, n_heads=8, n_kv_heads=2)
    attn = model.blocks[0].attn
    head_dim = 4
    assert attn.qkv.weight.shape == ((8 + 2 * 2) * head_dim, 32)
    assert attn.out_proj.weight.shape == (32, 8 * head_dim)
    cache = KVCache(len(model.blocks), max_len=12)
    model(torch.randint(0, 50, (3, 5)), kv_cache=cache)
    assert cache[0].k.shape == (3, 2, 12, head_dim)


def repeat_kv_heads(weight: torch.Tensor) -> torch.Tensor:
    """(2 kv heads * 4 dims, 16) -> (4 heads * 4 dims, 16): each kv head serves 2 query heads."""
    return weight.view(2, 4, 16).repeat_interleave(2, dim=0).reshape(16, 16)


def test_gqa_equals_multi_head_with_repeated_kv_heads():
    gqa = tiny_model(n_heads=4, n_kv_heads=2)
    mha = Transformer(tiny_config(n_heads=4, n_kv_heads=None)).eval()
    state = gqa.state_dict()
    for i in range(len(gqa.blocks)):
        key = f"blocks.{i}.attn.qkv.weight"
        q, k, v = state[key].split((16, 8, 8))
        state[key] = torch.cat((q, repeat_kv_heads(k), repeat_kv_heads(v)))
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(mha(idx), gqa(idx))


def test_sequence_too_long_names_values():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"sequence length 13 .*model.max_seq_len=12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 14"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=10)


def test_missing_vocab_size_says_what_to_do():
    with pytest.raises(ValueError, match="set model.vocab_size or build from prepared data"):
        Transformer(tiny_config(vocab_size=None))


def test_tied_and_untied_embeddings():
    tied = tiny_model(tied_embeddings=True)
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    untied = tiny_model(tied_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 50 * 16


def test_post_norm_has_no_final_norm():
    assert isinstance(tiny_model(pre_norm=False).norm, torch.nn.Identity)
    assert isinstance(tiny_model(pre_norm=True).norm, torch.nn.RMSNorm)


def test_layernorm_bias_follows_config():
    assert tiny_model(norm=Norm.layernorm, bias=True).norm.bias is not None
    assert tiny_model(norm=Norm.layernorm, bias=False).norm.bias is None


def test_init_weights_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=8, n_heads=4, bias=True, init_std=0.02)
    model = build_model(cfg)
    residual_std = 0.02 / math.sqrt(2 * 8)
    out_proj = torch.cat([block.attn.out_proj.weight.flatten() for block in model.blocks])
    down = torch.cat([block.mlp.down.weight.flatten() for block in model.blocks])
    assert out_proj.std().item() == pytest.approx(residual_std, rel=0.05)
    assert down.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.blocks[0].attn_norm.weight == 1)


def test_init_weights_refills_sinusoidal_table_after_meta_build():
    cfg = tiny_config(positional=Positional.sinusoidal)
    reference = Transformer(cfg).sinusoidal_table.clone()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.testing.assert_close(model.sinusoidal_table, reference)


def test_sinusoidal_table_is_vaswani_and_not_saved():
    model = tiny_model(positional=Positional.sinusoidal)
    assert "sinusoidal_table" not in model.state_dict()
    table = model.sinusoidal_table
    for pos, i in [(0, 0), (3, 0), (5, 2), (11, 7)]:
        angle = pos / 10000 ** (2 * i / 16)
        assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
        assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_learned_positions_are_a_parameter():
    model = tiny_model(positional=Positional.learned)
    assert model.pos_embeddings.weight.shape == (12, 16)
    assert not hasattr(tiny_model(positional=Positional.rope), "pos_embeddings")


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(q_pos: int, k_pos: int) -> float:
        cos, sin = compute_rope_cos_sin(1, 8, theta=10000.0, start_pos=q_pos)
        rotated_q = apply_rope(q, cos, sin)
        cos, sin = compute_rope_cos_sin(1, 8, theta=10000.0, start_pos=k_pos)
        return (rotated_q * apply_rope(k, cos, sin)).sum().item()

    assert score(5, 2) == pytest.approx(score(9, 6), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


@pytest.mark.parametrize("positional", list(Positional), ids=lambda p: p.name)
def test_cached_chunks_equal_full_forward(positional):
    model = tiny_model(positional=positional)
    idx = torch.randint(0, 50, (2, 11))
    full = model(idx)
    cache = KVCache(len(model.blocks), max_len=12)
    chunks = [model(idx[:, :4], kv_cache=cache), model(idx[:, 4:9], start_pos=4, kv_cache=cache)]
    chunks.append(model(idx[:, 9:10], start_pos=9, kv_cache=cache))
    chunks.append(model(idx[:, 10:], start_pos=10, kv_cache=cache))
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    idx = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_embedding_scale_multiplies_by_sqrt_d_model():
    scaled = tiny_model(embedding_scale=True, tied_embeddings=False, positional=Positional.learned)
    plain = tiny_model(embedding_scale=False, tied_embeddings=False, positional=Positional.learned)
    with torch.no_grad():
        plain.tok_embeddings.weight.mul_(4.0)  # sqrt(d_model=16)
    idx = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(scaled(idx), plain(idx))


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_norm", "post_norm"])
def test_block_wiring(pre_norm):
    block = tiny_model(pre_norm=pre_norm, norm=Norm.layernorm, bias=True).blocks[0]
    x = torch.randn(2, 5, 16)
    attn, mlp = block.attn, block.mlp
    if pre_norm:
        h = x + attn(block.attn_norm(x))
        expected = h + mlp(block.mlp_norm(h))
    else:  # the classic encoder layer: add, then norm
        h = block.attn_norm(x + attn(x))
        expected = block.mlp_norm(h + mlp(h))
    torch.testing.assert_close(block(x), expected)


def test_mlp_kinds_compute_their_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    swiglu = MLP(MLPKind.swiglu, 16, 24, bias=False)
    expected = swiglu.down(torch.nn.functional.silu(swiglu.gate(x)) * swiglu.up(x))
    torch.testing.assert_close(swiglu(x), expected)
    gelu = MLP(MLPKind.gelu, 16, 24, bias=True)
    h = gelu.up(x)
    tanh_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GPT-2's gelu
    torch.testing.assert_close(gelu(x), gelu.down(tanh_gelu))
    relu = MLP(MLPKind.relu, 16, 24, bias=True)
    torch.testing.assert_close(relu(x), relu.down(relu.up(x).clamp(min=0)))
    assert gelu.gate is None and relu.gate is None
