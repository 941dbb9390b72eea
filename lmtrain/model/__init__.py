"""The language model in plain PyTorch: config, Transformer, KV-cache generation.

Imports torch and the standard library only; Lightning, Hydra and DeepSpeed stay outside.
"""

import torch

from lmtrain.model.attention import KVCache, LayerKVCache
from lmtrain.model.config import Attention, DocumentKernel, MLPKind, ModelConfig, Norm, Positional
from lmtrain.model.transformer import Block, Transformer


def build_model(cfg: ModelConfig, *, seed: int | None = None) -> Transformer:
    """Construct a Transformer and initialise its weights (cfg.vocab_size must be set).

    seed: of Transformer.init_weights (None: one number drawn from torch's global RNG). The global
    RNG advances by that one draw only: the modules' own default inits run under a forked RNG (and
    are overwritten), so what follows is the same as after a meta-device build.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    with torch.random.fork_rng(devices=[]):
        model = Transformer(cfg)
    model.init_weights(seed)
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
