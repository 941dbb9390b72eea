"""Reading checkpoints: the newest valid one, and errors that name the file and the reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


def load_checkpoint_file(path: str | Path, *, mmap: bool = True) -> dict:
    """torch.load(weights_only=True) with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a write that was interrupted")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for bad files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) cannot be read: truncated, corrupt or not a torch checkpoint "
            f"({type(e).__name__}: {first_line[:200]})"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "lmtrain" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} is not an lmtrain checkpoint (no 'state_dict'/'lmtrain' record; found {keys})")
    return ckpt


def shape_of(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def shape_mismatches(saved: Mapping, expected: Mapping, aliases: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable differences between a checkpoint's tensors (or shapes) and a model's.
    `aliases` are tied names (lm_head.weight = tok_embeddings.weight) that sharded layouts store once."""
    problems = []
    for name, value in expected.items():
        if name not in saved:
            if name not in aliases:
                problems.append(f"{name}: missing from the checkpoint")
        elif shape_of(saved[name]) != shape_of(value):
            problems.append(f"{name}: checkpoint {shape_of(saved[name])} vs model {shape_of(value)}")
    problems += [f"{name}: in the checkpoint but not in the model" for name in saved if name not in expected]
    return problems


def list_step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-N.ckpt, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found, reverse=True)
