"""Rank-dependent side effects live here: who writes files, who prints."""

from __future__ import annotations

import os

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
