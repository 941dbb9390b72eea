"""Choosing the checkpoint a run continues from, and refusing the ones it cannot."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from lmtrain.checkpoint.files import CheckpointError, list_step_checkpoints, shape_mismatches
from lmtrain.checkpoint.formats import Layout, detect_layout, load_record, param_shapes

log = logging.getLogger(__name__)


def expected_shapes(module: nn.Module) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """State-dict shapes of `module`, and the names that alias an earlier tensor (tied weights)."""
    shapes, seen, aliases = {}, {}, set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        shapes[name] = tuple(tensor.shape)
        if id(tensor) in seen:
            aliases.add(name)
        seen[id(tensor)] = name
    return shapes, frozenset(aliases)


def check_compatible(path: Path, module: nn.Module, *, layout: Layout, world_size: int,
                     tokenizer_hash: str | None = None, seed: int | None = None) -> dict:
    """The checkpoint's record if this run can resume from it; CheckpointError saying why not.
    `world_size` is this run's; any world size can resume any checkpoint (see below)."""
    found = detect_layout(path)
    record = load_record(path)
    saved = record["lmtrain"]
    mine = getattr(module, "record", {}).get("task", {}).get("kind")
    theirs = saved.get("task", {}).get("kind", "causal_lm")
    if mine and theirs != mine:
        raise CheckpointError(
            f"checkpoint {path} was trained for task={theirs}, but this run trains task={mine}; resume it with "
            f"task={theirs}, or start a task={mine} run from its weights with init_from={path} and a new run_name"
        )
    if tokenizer_hash and saved.get("tokenizer_hash") not in (None, tokenizer_hash):
        raise CheckpointError(
            f"checkpoint {path} was trained on data tokenized differently (tokenizer {saved['tokenizer_hash'][:12]}, "
            f"this run's data {tokenizer_hash[:12]}); resume with the original data and tokenizer settings"
        )
    saved_seed = saved.get("config", {}).get("seed")
    if seed is not None and saved_seed is not None and saved_seed != seed:
        raise CheckpointError(
            f"checkpoint {path} was trained with seed={saved_seed} but this run has seed={seed}: the data order "
            f"depends on it, so resuming would revisit samples; resume with seed={saved_seed}"
        )
    if found is not layout:
        raise CheckpointError(
            f"checkpoint {path} is a {found.value} checkpoint but this run's strategy writes {layout.value} ones; "
            f"resume with the strategy that wrote it ({record['lmtrain'].get('strategy', '?')}), or start a new run "
            f"from its weights with init_from={path}"
        )
    # Another world size is no obstacle: DDP and FSDP (DCP) checkpoints load on any; a DeepSpeed one
    # is converted to DeepSpeed's universal checkpoint before it loads (lmtrain.checkpoint.universal).
    shapes, aliases = expected_shapes(module)
    if problems := shape_mismatches(param_shapes(path), shapes, aliases):
        raise CheckpointError(
            f"checkpoint {path} (step {record.get('global_step', '?')}) was saved from another model shape than this "
            "run's config:\n  " + "\n  ".join(problems[:20])
            + "\nresume with the run's original model config, or start a new run_name"
        )
    return record


def find_resume_checkpoint(directory: Path, module: nn.Module, *, layout: Layout, world_size: int,
                           tokenizer_hash: str | None = None, seed: int | None = None) -> Path | None:
    """The newest checkpoint in `directory` that loads; unreadable ones are named and skipped.

    A readable checkpoint this run cannot use (another model shape or strategy) is not skipped:
    the config changed under an existing run, which the user must resolve.
    """
    for step, path in list_step_checkpoints(directory):
        try:
            detect_layout(path)
            load_record(path)
        except CheckpointError as e:
            log.warning("skipping %s; falling back to an older checkpoint", e)
            continue
        check_compatible(path, module, layout=layout, world_size=world_size, tokenizer_hash=tokenizer_hash, seed=seed)
        return path
    return None
