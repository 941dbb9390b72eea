"""One live writer per run directory.

Two `lmtrain train` processes on one run dir would resume from each other's checkpoints, write
the same step files and interleave metrics. Rank 0 of a run holds an exclusive `flock` on
`<run>/owner.lock` for as long as it trains, and writes who it is into the file. The kernel drops
the lock when the process ends, however it ends (SIGKILL, OOM, a requeued SLURM job's old attempt),
so a dead owner never blocks a resume. On NFS the client maps flock onto POSIX locks, which the
server arbitrates between nodes.

A second writer is refused with the owner's host, pid and SLURM job. A requeued SLURM job whose
earlier attempt still holds the lock (a node that died with the job: the NFS server frees its
locks only when the lease expires) waits for it rather than failing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

OWNER_FILE = "owner.lock"
# How long a requeued attempt waits for its own job's earlier attempt to let go (an NFS lease: 90 s by default).
TAKEOVER_WAIT_S = 300.0


class RunDirBusy(ValueError):
    """Another live process owns the run directory."""


def owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


def describe_owner(record: dict) -> str:
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"pid {record.get('pid')} on {record.get('host')}{job}, since {record.get('started')}"


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


class RunDirOwner:
    """Held by rank 0 while it trains; release() (or process exit) lets the next owner in."""

    def __init__(self, run_dir: Path, *, takeover_wait_s: float = TAKEOVER_WAIT_S,
                 log=lambda message: print(message, flush=True)) -> None:
        self.path = Path(run_dir) / OWNER_FILE
        self.fd: int | None = None
        self._acquire(takeover_wait_s, log)

    def _acquire(self, takeover_wait_s: float, log) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the owner's record is in there
        except OSError as e:
            raise ValueError(f"cannot write to the run directory {self.path.parent}: {e.strerror}; choose another "
                             "runs_dir= (a writable filesystem every node sees)") from None
        deadline, waiting = time.monotonic() + takeover_wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                    log(f"warning: the filesystem of {self.path.parent} does not support file locks ({e.strerror}); "
                        "lmtrain cannot stop a second process from training into this run dir")
                    break
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                owner = _read(fd)
                if not _same_job_earlier_attempt(owner) or time.monotonic() > deadline:
                    os.close(fd)
                    raise RunDirBusy(
                        f"run dir {self.path.parent} is in use by another lmtrain train ({describe_owner(owner)}); "
                        "wait for it to finish or stop it, or choose another run_name"
                    ) from None
                if not waiting:
                    log(f"waiting for the previous attempt of this job ({describe_owner(owner)}) to release "
                        f"{self.path} (up to {takeover_wait_s:.0f} s)")
                    waiting = True
                time.sleep(1.0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner_record()) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def check_run_dir_free(run_dir: Path) -> None:
    """Raise RunDirBusy if a live process owns run_dir (for `lmtrain submit`: a job that would be
    refused when it starts is refused before it queues)."""
    path = Path(run_dir) / OWNER_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise RunDirBusy(f"run dir {run_dir} is in use by another lmtrain train ({describe_owner(_read(fd))}); "
                             "wait for it to finish or stop it, or choose another run_name") from None
    finally:
        os.close(fd)  # also releases the probe's lock


def _same_job_earlier_attempt(owner: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    return bool(job) and owner.get("slurm_job_id") == job and int(owner.get("slurm_restart_count", 0)) < restarts
