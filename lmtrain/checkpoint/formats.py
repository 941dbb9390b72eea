"""The three checkpoint layouts lmtrain writes, read through one interface.

- file: one torch.save file (single device, DDP, ZeRO-free strategies), written atomically.
- deepspeed: a directory `<tag>/mp_rank_00_model_states.pt` (+ per-rank ZeRO optimizer shards).
- dcp: a torch.distributed.checkpoint directory (FSDP2): `.metadata`, `__<rank>_0.distcp`, `meta.pt`.

Names are those of the LightningModule's state dict (`model.blocks.0...`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import torch

from lmtrain.checkpoint.files import CheckpointError, load_checkpoint_file, resolve_checkpoint

DCP_PREFIX = "state_dict."


class Layout(Enum):
    file = "file"
    deepspeed = "deepspeed"
    dcp = "dcp"


def detect_layout(path: Path) -> Layout:
    path = resolve_checkpoint(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        return Layout.file
    if (path / "latest").is_file():
        return Layout.deepspeed
    if (path / ".metadata").is_file() and (path / "meta.pt").is_file():
        return Layout.dcp
    raise CheckpointError(
        f"checkpoint directory {path} is incomplete or not a checkpoint: no DeepSpeed 'latest' file and no "
        f"distributed-checkpoint '.metadata' + 'meta.pt' (found: {sorted(p.name for p in path.iterdir())[:8]})"
    )


def _deepspeed_model_states(path: Path) -> Path:
    """Rank 0's model-states file: `mp_rank_00_...` for ZeRO-1/2, `zero_pp_rank_0_mp_rank_00_...` for ZeRO-3."""
    tag_dir = Path(path) / (Path(path) / "latest").read_text().strip()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    return tag_dir / "mp_rank_00_model_states.pt"  # absent: _load names it


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads only what is used
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file {path} is missing: an incomplete sharded checkpoint") from e
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: truncated or corrupt ({type(e).__name__})") from e


def load_record(path: Path) -> dict:
    """Everything but the weights and optimizer state: loop counters, data state, the lmtrain record."""
    path = resolve_checkpoint(path)
    layout = detect_layout(path)
    match layout:
        case Layout.file:
            record = load_checkpoint_file(path)
        case Layout.deepspeed:
            record = _load(_deepspeed_model_states(path))
        case Layout.dcp:
            record = _load(Path(path) / "meta.pt")
    if "lmtrain" not in record:
        raise CheckpointError(f"checkpoint {path} is not an lmtrain checkpoint (no 'lmtrain' record)")
    return record


def param_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    path = resolve_checkpoint(path)
    layout = detect_layout(path)
    match layout:
        case Layout.file:
            return {k: tuple(v.shape) for k, v in load_checkpoint_file(path)["state_dict"].items()}
        case Layout.deepspeed:
            groups = _load(_deepspeed_model_states(path))["param_shapes"]
            return {k: tuple(v) for group in groups for k, v in group.items()}
        case Layout.dcp:
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
            return {k[len(DCP_PREFIX):]: tuple(v.size) for k, v in metadata.items() if k.startswith(DCP_PREFIX)}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full (consolidated) model state dict on CPU, whatever layout wrote it."""
    path = resolve_checkpoint(path)
    layout = detect_layout(path)
    match layout:
        case Layout.file:
            return dict(load_checkpoint_file(path, mmap=False)["state_dict"])
        case Layout.deepspeed:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            tag = (path / "latest").read_text().strip()
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag))
        case Layout.dcp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
            state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.items()
                     if k.startswith(DCP_PREFIX) and hasattr(v, "size")}
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
            return {k[len(DCP_PREFIX):]: v for k, v in state.items()}
