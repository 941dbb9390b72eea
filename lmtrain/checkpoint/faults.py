"""Fault injection for tests of what survives a crash or a preemption: the process really
SIGKILLs itself, crashes or stops at a named point, so the test sees exactly what a preempted or
OOM-killed job leaves behind, and never has to guess how long N steps take on this machine.

LMTRAIN_FAULT=kill_after_checkpoint:<step>        after step <step>'s checkpoint is complete
LMTRAIN_FAULT=kill_during_checkpoint_write:<step> after writing that checkpoint's temp file, before the rename
LMTRAIN_FAULT=crash:<rank>:<step>                 rank <rank> raises at the start of step <step> (a crashed worker)
LMTRAIN_FAULT=hold:<step>                         after step <step> (and its checkpoint, if one is due), wait until
                                                  the requeue signal (SLURM's time-limit or preemption signal)
                                                  or a SIGTERM arrives, or until the test kills the run.
                                                  Under SLURM only the first attempt holds: the requeued one runs on.

LMTRAIN_FAULT_RUN=<run_name> limits the fault to the run of that name (one trial of a sweep).
"""

from __future__ import annotations

import os
import signal
import sys
import time

FAULT_ENV = "LMTRAIN_FAULT"
FAULT_RUN_ENV = "LMTRAIN_FAULT_RUN"
_run_name: str | None = None


def set_run_name(name: str) -> None:
    global _run_name
    _run_name = name


def _spec() -> str:
    only = os.environ.get(FAULT_RUN_ENV)
    if only and _run_name != only:
        return ""
    return os.environ.get(FAULT_ENV, "")


def fault_step(name: str) -> int | None:
    kind, _, step = _spec().partition(":")
    return int(step) if kind == name and step else None


def maybe_kill(name: str, step: int) -> None:
    if fault_step(name) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_crash(rank: int, step: int) -> None:
    kind, _, where = _spec().partition(":")
    if kind == "crash" and where == f"{rank}:{step}":
        raise RuntimeError(f"{FAULT_ENV}: injected crash of rank {rank} at step {step}")


def maybe_hold(step: int) -> None:
    """The `hold` fault: wait for the requeue signal or a SIGTERM (both only recorded by their handlers)."""
    if fault_step("hold") != step or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:
        return
    from lmtrain.distributed.preemption import received, requeue_signal

    signums = (requeue_signal(), signal.SIGTERM)
    print(f"{FAULT_ENV}: holding after step {step} until {' or '.join(signal.Signals(s).name for s in signums)} "
          f"(pid {os.getpid()})", file=sys.stderr, flush=True)
    while not any(received(s) for s in signums):
        time.sleep(0.05)
