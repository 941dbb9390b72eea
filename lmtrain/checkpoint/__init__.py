"""Checkpoint files: atomic writes, validation with clear errors, finding the newest valid one."""

from lmtrain.checkpoint.files import (
    LAST_CHECKPOINT,
    CheckpointError,
    is_pointer,
    list_step_checkpoints,
    load_checkpoint_file,
    resolve_checkpoint,
    shape_mismatches,
)
from lmtrain.checkpoint.formats import Layout, detect_layout, load_record, load_weights, param_shapes
from lmtrain.checkpoint.io import AtomicCheckpointIO
from lmtrain.checkpoint.resume import check_compatible, expected_shapes, find_resume_checkpoint

__all__ = [
    "LAST_CHECKPOINT",
    "AtomicCheckpointIO",
    "CheckpointError",
    "Layout",
    "check_compatible",
    "detect_layout",
    "expected_shapes",
    "find_resume_checkpoint",
    "is_pointer",
    "resolve_checkpoint",
    "list_step_checkpoints",
    "load_checkpoint_file",
    "load_record",
    "load_weights",
    "param_shapes",
    "shape_mismatches",
]
