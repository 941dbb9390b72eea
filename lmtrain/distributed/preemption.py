"""Stop signals, caught from the first moment of the process and only recorded.

SLURM may signal a job while it is still importing torch; the default action of SIGUSR1 is to
terminate, so the requeue signal's handler is installed by the CLI before any heavy import.
SIGTERM's is installed once training runs (lmtrain.callbacks.stop), replacing Lightning's. Both act
at the next optimizer-step boundary the ranks agree on.
"""

from __future__ import annotations

import os
import signal

_received: set[int] = set()


def requeue_signal() -> int:
    return getattr(signal, "SIG" + os.environ.get("LMTRAIN_REQUEUE_SIGNAL", "USR1"))


def install(signum: int) -> None:
    signal.signal(signum, lambda received, frame: _received.add(received))


def received(signum: int) -> bool:
    return signum in _received
