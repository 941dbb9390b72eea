"""Reading checkpoints: the newest valid one, and errors that name the file and the reason."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")
LAST_CHECKPOINT = "last.ckpt"
# last.ckpt is a small file naming the newest step checkpoint (object-store FUSE mounts have no
# symlinks); runs from before it have a symlink there, which every reader still follows.
POINTER_MAGIC = b"lmtrain checkpoint pointer\n"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


def is_pointer(path: Path) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_size < 512 and \
            path.read_bytes().startswith(POINTER_MAGIC)
    except OSError:
        return False


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path names: the step checkpoint a last.ckpt pointer file (or an older run's
    last.ckpt symlink) points at, else the path itself."""
    path = Path(path)
    if path.is_symlink():
        return path.resolve()
    if not is_pointer(path):
        return path
    name = path.read_bytes()[len(POINTER_MAGIC):].decode("utf-8", "replace").strip()
    if not STEP_FILE.match(name):
        raise CheckpointError(f"{path} should name a step checkpoint (step-N.ckpt) but holds {name!r}; pass a "
                              "step-N.ckpt of that directory instead")
    target = path.parent / name
    if not target.exists():
        found = [p.name for _, p in list_step_checkpoints(path.parent)[:5]]
        raise CheckpointError(f"{path} points at {name}, which is not there (found: {found or 'no step checkpoints'}); "
                              "pass one of those instead")
    return target


def write_pointer(directory: Path, target: Path, name: str = LAST_CHECKPOINT) -> None:
    """<directory>/last.ckpt := a pointer to target, replaced atomically (temp file, fsync, rename;
    a symlink left by an older lmtrain is replaced the same way)."""
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(POINTER_MAGIC + target.name.encode() + b"\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, directory / name)


def load_checkpoint_file(path: str | Path, *, mmap: bool = True) -> dict:
    """torch.load(weights_only=True) with errors that say what is wrong with the file."""
    path = resolve_checkpoint(path)
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
