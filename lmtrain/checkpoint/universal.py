"""A DeepSpeed ZeRO checkpoint resumed on another number of ranks, through DeepSpeed's universal checkpoint.

ZeRO saves each rank's slice of the flattened fp32 weights and Adam moments; those slices only fit
the world size that wrote them. DeepSpeed's converter (deepspeed.checkpoint.ds_to_universal) turns
them into one file per parameter and state (`<ckpt>/universal/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`),
which an engine with `"checkpoint": {"load_universal": true}` loads on any world size.

lmtrain converts automatically when a run resumes a DeepSpeed checkpoint on another world size:
rank 0 converts once, in its own process, before any process group exists (the conversion needs
none); the other ranks wait for the result on the shared filesystem. The result sits inside the
step checkpoint next to its untouched shards (`universal/` and `latest_universal`, DeepSpeed's own
names), so a later resume on yet another world size reuses it, and pruning the checkpoint removes it.

A conversion is whole or absent: it is written under a temp name, renamed to `universal/`, and only
then does `latest_universal` (written atomically) name it. A conversion killed at any point leaves
no `latest_universal`, and the next attempt removes what it left and converts again.

LMTRAIN_FAULT=kill_during_universal_conversion:<step> SIGKILLs the converting process after DeepSpeed's
converter finished writing the temp dir of step <step>'s checkpoint, before the rename.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from lmtrain.checkpoint.faults import maybe_kill
from lmtrain.checkpoint.files import CheckpointError, resolve_checkpoint
from lmtrain.checkpoint.formats import Layout, detect_layout, load_record
from lmtrain.checkpoint.io import TMP_MARKER, fsync_dir, fsync_path, write_atomic

UNIVERSAL_TAG = "universal"
POINTER = "latest_universal"  # the name DeepSpeed's engine reads when load_universal is on
TMP_PREFIX = f".{UNIVERSAL_TAG}{TMP_MARKER}"
POLL_S = 2.0


def saved_world_size(path: Path) -> int | None:
    """The number of ranks that wrote the checkpoint, as its lmtrain record says (None: not recorded)."""
    return load_record(path)["lmtrain"].get("world_size")


def needs_universal(path: Path, world_size: int) -> bool:
    """Whether resuming `path` on `world_size` ranks goes through a universal checkpoint: a DeepSpeed
    checkpoint written by another number of ranks."""
    path = resolve_checkpoint(path)
    if detect_layout(path) is not Layout.deepspeed:
        return False
    saved = saved_world_size(path)
    return saved is not None and saved != world_size


def universal_dir(path: Path) -> Path | None:
    """The complete universal conversion inside checkpoint `path`, or None when there is none."""
    try:
        tag = (path / POINTER).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    found = path / tag
    if tag and (found / "zero" / "optimizer_state.pt").is_file() and any(found.glob("*model_states.pt")):
        return found
    return None


def convert_to_universal(path: Path, *, log: Callable[[str], None] = print) -> Path:
    """Convert DeepSpeed checkpoint `path` (a step-N.ckpt directory) in place to a universal checkpoint,
    unless it already holds one; returns `<path>/universal`. One process, no torch.distributed."""
    path = resolve_checkpoint(path)
    if (done := universal_dir(path)) is not None:
        return done
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    for stale in path.glob(f"{TMP_PREFIX}*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    (path / POINTER).unlink(missing_ok=True)  # names nothing complete (universal_dir said so)
    final = path / UNIVERSAL_TAG
    shutil.rmtree(final, ignore_errors=True)  # renamed into place but never named by the pointer: untrusted
    tmp = path / f"{TMP_PREFIX}{os.getpid()}"
    tag = (path / "latest").read_text().strip()
    record = load_record(path)
    saved = record["lmtrain"].get("world_size", "?")
    log(f"converting {path} (written by {saved} rank{'' if saved == 1 else 's'}) to a DeepSpeed universal checkpoint, "
        f"once: it is kept as {final} beside the original shards")
    started = time.perf_counter()
    output = io.StringIO()  # the converter's progress lines; shown if it fails
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            ds_to_universal(SimpleNamespace(
                input_folder=str(path / tag), output_folder=str(tmp / UNIVERSAL_TAG),
                num_extract_workers=1, num_merge_workers=1,  # in this process: no worker pool
                keep_temp_folder=False, strict=True,
                # lmtrain's engine saves no universal_checkpoint_info (no tensor or pipeline parallelism to
                # describe); the converter asserts without it unless it injects the default.
                inject_missing_state=True,
            ))
        converted = tmp / UNIVERSAL_TAG
        for f in converted.rglob("*"):
            if f.is_file():
                fsync_path(f)
        maybe_kill("kill_during_universal_conversion", int(record.get("global_step", -1)))
        os.replace(converted, final)
        fsync_dir(path)
        write_atomic(path / POINTER, lambda p: p.write_text(UNIVERSAL_TAG))  # the conversion counts from here on
    except Exception as e:
        tail = "\n".join(output.getvalue().strip().splitlines()[-15:])
        raise CheckpointError(
            f"converting DeepSpeed checkpoint {path} to a universal checkpoint (to resume it on another number of "
            f"ranks) failed: {type(e).__name__}: {e}" + (f"\nthe converter's last lines:\n{tail}" if tail else "")
            + f"\nresume on the {record['lmtrain'].get('world_size', 'original number of')} ranks that wrote it, or "
            f"start a new run from its weights only with init_from={path}"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted {path} in {time.perf_counter() - started:.0f} s")
    return final


def _progress(path: Path) -> tuple:
    """What changes while a conversion runs in `path`: the temp dirs and the entries a few levels down
    (cheap on a shared filesystem: no walk of every parameter's files)."""
    seen = []
    for tmp in sorted(path.glob(f"{TMP_PREFIX}*")):
        for d in (tmp, tmp / UNIVERSAL_TAG, tmp / UNIVERSAL_TAG / "tmp", tmp / UNIVERSAL_TAG / "zero"):
            with contextlib.suppress(OSError):
                seen.append((str(d), d.stat().st_mtime_ns, len(os.listdir(d))))
    return tuple(seen)


def wait_for_universal(path: Path, *, stall_s: float, poll_s: float = POLL_S) -> Path:
    """On a rank other than 0: wait until rank 0's conversion of `path` is complete. Gives up after
    stall_s seconds in which the conversion shows no progress (rank 0 died without the launcher
    ending this job, or it converts on a filesystem this rank does not see)."""
    path = resolve_checkpoint(path)
    last, since = None, time.monotonic()
    while (done := universal_dir(path)) is None:
        now = _progress(path)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise CheckpointError(
                f"waited {stall_s:.0f} s (strategy.timeout_s) for rank 0 to convert {path} to a universal checkpoint "
                f"and it made no progress: no {path / POINTER} appeared. Check rank 0's log; the run dir must be on a "
                "filesystem every node sees"
            )
        time.sleep(poll_s)
    return done


def prepare_universal(path: Path, *, rank_zero: bool, stall_s: float, log: Callable[[str], None] = print) -> Path:
    """Make DeepSpeed checkpoint `path` loadable on another world size: rank 0 converts it (once),
    every other rank waits for that conversion. Collective-free: it runs before the process group exists."""
    if rank_zero:
        return convert_to_universal(path, log=log)
    return wait_for_universal(path, stall_s=stall_s)
