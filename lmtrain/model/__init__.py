"""The language model in plain PyTorch: config, Transformer, KV-cache generation.

Imports torch and the standard library only; Lightning, Hydra and DeepSpeed stay outside.
"""

from lmtrain.model.attention import KVCache, LayerKVCache
from lmtrain.model.config import Attention, DocumentKernel, MLPKind, ModelConfig, Norm, Positional
from lmtrain.model.transformer import Block, Transformer


def build_model(cfg: ModelConfig) -> Transformer:
    """Construct a Transformer and initialise its weights (cfg.vocab_size must be set)."""
    model = Transformer(cfg)
    model.init_weights()
    return model


__all__ = [
    "Attention",
    "Block",
    "DocumentKernel",
    "KVCache",
    "LayerKVCache",
    "MLPKind",
    "ModelConfig",
    "Norm",
    "Positional",
    "Transformer",
    "build_model",
]
