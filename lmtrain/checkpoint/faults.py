"""Fault injection for tests of what survives a crash: the process really SIGKILLs itself at a
named point, so the test sees exactly what a preempted or OOM-killed job leaves behind.

LMTRAIN_FAULT=kill_after_checkpoint:<step>        after step <step>'s checkpoint is complete
LMTRAIN_FAULT=kill_during_checkpoint_write:<step> after writing that checkpoint's temp file, before the rename
LMTRAIN_FAULT=crash:<rank>:<step>                 rank <rank> raises at the start of step <step> (a crashed worker)
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LMTRAIN_FAULT"


def fault_step(name: str) -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    kind, _, step = spec.partition(":")
    return int(step) if kind == name and step else None


def maybe_kill(name: str, step: int) -> None:
    if fault_step(name) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_crash(rank: int, step: int) -> None:
    kind, _, where = os.environ.get(FAULT_ENV, "").partition(":")
    if kind == "crash" and where == f"{rank}:{step}":
        raise RuntimeError(f"{FAULT_ENV}: injected crash of rank {rank} at step {step}")
