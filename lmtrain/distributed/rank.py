"""Rank-dependent side effects live here: who writes files, who prints."""

from __future__ import annotations

import logging
import os
import warnings

from lightning.pytorch.utilities.rank_zero import rank_zero_only


def global_rank_from_env() -> int:
    """The launcher's rank before any process group exists (torchrun, SLURM, Lightning's children)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    # Lightning's own launcher gives children LOCAL_RANK and NODE_RANK only.
    local = int(os.environ.get("LOCAL_RANK", 0))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return node * per_node + local if local or node else 0


def is_rank_zero() -> bool:
    return rank_zero_only.rank == 0 and global_rank_from_env() == 0


def say(message: str) -> None:
    """Print once per job (rank 0), flushed so it interleaves correctly with Lightning's output."""
    if is_rank_zero():
        print(message, flush=True)


# Lines Lightning prints that are not for lmtrain's users: an advertisement for a hosted logger on
# every run, and (on any machine where `srun` exists, e.g. a login node) a hint to use srun for a
# local run. lmtrain's SLURM path runs under srun itself and says so when something is wrong.
_NOT_FOR_USERS = ("Tip: For seamless cloud logging", "The `srun` command is available on your system but is not used")


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _NOT_FOR_USERS)


def quiet_third_party_hints() -> None:
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())
    warnings.filterwarnings("ignore", message=".*" + _NOT_FOR_USERS[1])
