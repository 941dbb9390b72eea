"""Checkpoint files: atomic writes, validation with clear errors, finding the newest valid one."""

from lmtrain.checkpoint.files import (
    CheckpointError,
    find_resume_checkpoint,
    list_step_checkpoints,
    load_checkpoint_file,
    shape_mismatches,
)
from lmtrain.checkpoint.io import AtomicCheckpointIO

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "find_resume_checkpoint",
    "list_step_checkpoints",
    "load_checkpoint_file",
    "shape_mismatches",
]
