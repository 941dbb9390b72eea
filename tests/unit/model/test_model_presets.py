"""Every conf/model preset loads into ModelConfig, and the GPT-2/TinyLlama shapes count right."""

from pathlib import Path

import pytest
import torch
import yaml

from lmtrain.model import ModelConfig, Transformer

PRESET_DIR = Path(__file__).resolve().parents[3] / "conf" / "model"
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()))


def test_presets_exist():
    names = {path.stem for path in PRESETS}
    assert {"tiny", "gpt2_124m", "gpt2_355m", "llama_160m", "llama_1b", "seed_transformer"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.stem)
def test_preset_loads_and_builds_on_meta(path):
    raw = yaml.safe_load(path.read_text())
    assert "defaults" not in raw
    cfg = ModelConfig(**raw)  # an unknown key raises TypeError
    assert cfg.name == path.stem
    with torch.device("meta"):
        model = Transformer(cfg if cfg.vocab_size else cfg.with_vocab(1000))
    assert model.num_parameters() > 0


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.stem)
def test_preset_merges_into_structured_config(path):
    omegaconf = pytest.importorskip("omegaconf")
    schema = omegaconf.OmegaConf.structured(ModelConfig)
    merged = omegaconf.OmegaConf.merge(schema, omegaconf.OmegaConf.load(path))
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert cfg == load_preset(path.stem)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("gpt2_124m", 124_439_808), ("gpt2_355m", 354_823_168), ("llama_1b", 1_100_048_384)],
)
def test_parameter_count(name, expected):
    cfg = load_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == expected


def test_gpt2_vocab_is_padded_but_padding_not_counted():
    cfg = load_preset("gpt2_124m")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.tok_embeddings.weight.shape == (50304, 768)
    all_tensors = sum(p.numel() for p in model.parameters())
    assert all_tensors - model.num_parameters() == (50304 - 50257) * 768


def test_flops_per_token_gpt2():
    cfg = load_preset("gpt2_124m")
    with torch.device("meta"):
        model = Transformer(cfg)
    n_matmul = 124_439_808 - 1024 * 768  # tied: no lookup-only matrix; minus the position table
    assert model.flops_per_token(1024) == 6 * n_matmul + 12 * 12 * 12 * 64 * 1024


def test_flops_per_token_untied_drops_input_embedding():
    cfg = load_preset("llama_1b")
    with torch.device("meta"):
        model = Transformer(cfg)
    n_matmul = 1_100_048_384 - 32000 * 2048
    assert model.flops_per_token(2048) == 6 * n_matmul + 12 * 22 * 32 * 64 * 2048
