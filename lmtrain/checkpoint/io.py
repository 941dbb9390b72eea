"""A checkpoint is whole or absent: write a temp file beside the target, fsync, rename."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lmtrain.checkpoint.faults import maybe_kill

TMP_MARKER = ".tmp-"


def fsync_path(path: Path) -> None:
    """Flush a file's data or a directory's entries to disk; fsync acts on the inode, so a read-only
    descriptor opened after the writer closed the file does it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, step: int | None = None) -> None:
    """`write(tmp)` creates a temp file beside `path`; it is fsynced and renamed over `path`, so a
    reader (or a kill at any moment) sees the old file or the new one, never a partial one. The temp
    file lives in the target directory: a rename is atomic only within one filesystem (Lightning's
    default goes through $TMPDIR and is not). If `write` raises, the temp file is removed and `path`
    is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        if step is not None:
            maybe_kill("kill_during_checkpoint_write", step)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def save_atomic(obj: Any, path: str | os.PathLike, *, step: int | None = None) -> None:
    """torch.save to `path` through `write_atomic`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomic(path, write, step=step)


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


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind an error (torch's writer wraps a failed write in a RuntimeError)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        try:
            save_atomic(checkpoint, path, step=checkpoint.get("global_step"))
        except (OSError, RuntimeError) as error:
            if (os_error := os_error_in(error)) is None:
                raise
            from lmtrain.checkpoint.files import CheckpointError, list_step_checkpoints

            kept = [p for _, p in list_step_checkpoints(Path(path).parent) if p != Path(path)]
            raise CheckpointError(
                f"could not write checkpoint {path}: {os_error.strerror} ({errno.errorcode.get(os_error.errno, '?')}); "
                f"nothing was replaced, the newest complete checkpoint is "
                + (f"{kept[0]}" if kept else "none (no earlier one)")
                + ". Free space or fix the filesystem, then run the same command to resume"
            ) from error
