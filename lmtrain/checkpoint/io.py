"""A checkpoint is whole or absent: write a temp file beside the target, fsync, rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lmtrain.checkpoint.faults import maybe_kill

TMP_MARKER = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: str | os.PathLike, *, step: int | None = None) -> None:
    """torch.save to `path` so that a reader (or a kill at any moment) sees the old file or the new
    one, never a partial one. The temp file lives in the target directory: a rename is atomic only
    within one filesystem (Lightning's default goes through $TMPDIR and is not)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if step is not None:
            maybe_kill("kill_during_checkpoint_write", step)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Temp files left by a save that was killed; a live save by another process of this run is
    impossible here because only rank 0 of one job writes."""
    removed = []
    if directory.is_dir():
        for p in directory.glob(f"*{TMP_MARKER}*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_atomic(checkpoint, path, step=checkpoint.get("global_step"))
