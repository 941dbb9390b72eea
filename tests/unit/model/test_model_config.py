"""ModelConfig validation: errors name the field and the value, enums accept names."""

import pytest

from lmtrain.model import MLPKind, ModelConfig, Norm, Positional


@pytest.mark.parametrize(
    ("overrides", "expected_in_message"),
    [
        ({"n_heads": 5}, ["model.n_heads=5", "model.d_model=256"]),
        ({"n_heads": 4, "n_kv_heads": 3}, ["model.n_kv_heads=3", "model.n_heads=4"]),
        ({"dropout": 1.0}, ["model.dropout=1.0"]),
        ({"dropout": -0.1}, ["model.dropout=-0.1"]),
        ({"d_model": 24, "n_heads": 8}, ["model.positional=rope", "3"]),  # head dim 3 is odd
        ({"vocab_size": 0}, ["model.vocab_size=0"]),
        ({"d_model": -8}, ["model.d_model=-8"]),
        ({"n_layers": 0}, ["model.n_layers=0"]),
        ({"max_seq_len": 0}, ["model.max_seq_len=0"]),
        ({"d_ff": 0}, ["model.d_ff=0"]),
        ({"pad_vocab_multiple": 0}, ["model.pad_vocab_multiple=0"]),
        ({"norm_eps": 0.0}, ["model.norm_eps=0.0"]),
        ({"positional": "alibi"}, ["model.positional='alibi'", "rope, learned, sinusoidal"]),
        ({"mlp": "geglu"}, ["model.mlp='geglu'", "swiglu"]),
    ],
)
def test_invalid_config_names_field_and_value(overrides, expected_in_message):
    with pytest.raises(ValueError) as error:
        ModelConfig(**overrides)
    for fragment in expected_in_message:
        assert fragment in str(error.value)


def test_odd_head_dim_is_fine_without_rope():
    cfg = ModelConfig(d_model=24, n_heads=8, positional=Positional.learned)
    assert cfg.head_dim == 3


def test_enum_fields_accept_names_and_members():
    from_names = ModelConfig(positional="sinusoidal", norm="layernorm", mlp="relu")
    from_members = ModelConfig(positional=Positional.sinusoidal, norm=Norm.layernorm, mlp=MLPKind.relu)
    assert from_names == from_members
    assert from_names.positional is Positional.sinusoidal


def test_enum_member_names_equal_values():
    for enum_type in (Positional, Norm, MLPKind):
        assert all(member.name == member.value for member in enum_type)


def test_defaults_resolve():
    cfg = ModelConfig(d_model=64, n_heads=4)
    assert (cfg.kv_heads, cfg.ffn_dim, cfg.head_dim) == (4, 256, 16)


def test_with_vocab_and_padding():
    cfg = ModelConfig().with_vocab(70)
    assert cfg.vocab_size == 70
    assert cfg.padded_vocab_size == 128
    assert ModelConfig(vocab_size=128).padded_vocab_size == 128
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304
    with pytest.raises(ValueError, match="model.vocab_size=-1"):
        ModelConfig().with_vocab(-1)


def test_padded_vocab_without_vocab_says_what_to_do():
    with pytest.raises(ValueError, match="set model.vocab_size"):
        ModelConfig().padded_vocab_size
