"""Compile and activation checkpointing, applied to a built model from outside its code.

Both act on each Transformer block in place, so state-dict keys stay those of the plain model
(no `_orig_mod.` or `_checkpoint_wrapped_module.` prefixes) and checkpoints stay interchangeable.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> None:
    for block in model.blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def apply_compile(model: nn.Module) -> None:
    # Per block (as torchtitan does): blocks share one compiled graph, compile time stays flat in depth.
    for block in model.blocks:
        block.compile()
