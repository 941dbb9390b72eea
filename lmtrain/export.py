"""`lmtrain export`: any strategy's checkpoint -> one consolidated state dict (fp32 or bf16).

The output is written like a checkpoint (temp file beside it, fsync, rename) and never lands on
something this command did not make unless told to: an existing file needs `overwrite=true`, and a
training checkpoint is refused even then (an export written over a run's newest step once cost
that run 10 steps and its optimizer state on resume).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from lmtrain.checkpoint import (LAST_CHECKPOINT, CheckpointError, detect_layout, is_pointer, list_step_checkpoints,
                                load_checkpoint_file, load_weights, resolve_checkpoint)
from lmtrain.checkpoint.io import os_error_in, save_atomic, write_atomic
from lmtrain.config import ExportConfig, ExportFormat
from lmtrain.trained import RunRecord, read_record

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SUFFIXES = {ExportFormat.torch: ".pt", ExportFormat.safetensors: ".safetensors", ExportFormat.hf: "-hf"}


def export_state_dict(ckpt: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], RunRecord]:
    """Plain model weights (names as in lmtrain.model.Transformer; a task head's as `head.*`) and
    the checkpoint's record."""
    run = read_record(ckpt)
    weights = load_weights(ckpt)
    state = {k.removeprefix("model."): v.to(dtype) if v.is_floating_point() else v
             for k, v in weights.items() if k.startswith(("model.", "head."))}
    if run.model.tied_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as tok_embeddings.weight
    return state, run


def default_out_path(ckpt: Path, dtype: str, fmt: ExportFormat) -> Path:
    """runs/<run>/export-<checkpoint>-<dtype>.pt|.safetensors|-hf (`last.ckpt` named by its target)."""
    return ckpt.parent.parent / f"export-{resolve_checkpoint(ckpt).name.removesuffix('.ckpt')}-{dtype}{SUFFIXES[fmt]}"


def _is_run_checkpoints_dir(directory: Path) -> bool:
    """A `checkpoints/` directory that training owns (a folder of the user's that happens to be
    called so is not one)."""
    run_dir = directory.parent
    return directory.name == "checkpoints" and (
        (run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file()
        or (directory / LAST_CHECKPOINT).is_symlink() or is_pointer(directory / LAST_CHECKPOINT)
        or bool(list_step_checkpoints(directory)))


def _loads_as_checkpoint(path: Path) -> bool:
    try:
        load_checkpoint_file(path)  # mmap: reads the record, not the tensors
    except CheckpointError:
        return False
    return True


def checkpoint_in_the_way(out: Path, ckpt: Path) -> str | None:
    """What training checkpoint writing `out` would destroy or step into, or None. Symlinks are
    and last.ckpt pointers followed, and hard links to the input are caught by inode."""
    target, source = out.resolve(), resolve_checkpoint(ckpt).resolve()
    exists = out.exists()
    if target == source or source in target.parents or (exists and os.path.samefile(out, ckpt)):
        return f"the input checkpoint {ckpt}" + (f" (-> {source})" if source != ckpt.absolute() else "")
    for directory in dict.fromkeys([*Path(os.path.abspath(out)).parents, *target.parents]):  # abspath: '..' as written
        if directory.suffix == ".ckpt":
            return f"inside the sharded checkpoint {directory}"
        if _is_run_checkpoints_dir(directory):
            return f"inside the run's checkpoints directory {directory}"
    if exists and not out.is_dir():
        if target.suffix == ".ckpt" or out.suffix == ".ckpt":
            return "a .ckpt file"
        if _loads_as_checkpoint(target):
            return "an lmtrain training checkpoint"
    return None


def check_out_path(out: Path, *, ckpt: Path, overwrite: bool, is_default: bool, directory: bool = False) -> None:
    """Refuse, before the checkpoint is loaded, an output that cannot or must not be written
    (`directory`: format=hf, whose output is a directory, checked by lmtrain.hf.export.check_out_dir)."""
    if reason := checkpoint_in_the_way(out, ckpt):
        raise ValueError(f"refusing to write the export to {out}: it is {reason}, and a training checkpoint is never "
                         f"written over (not even with overwrite=true); choose another out=PATH outside the run's checkpoints/")
    if directory:
        from lmtrain.hf.export import check_out_dir

        check_out_dir(out, overwrite=overwrite)
    elif out.is_dir():
        raise ValueError(f"export out={out} is a directory; give the path of a file to write, e.g. out={out / 'model.pt'}")
    elif (out.exists() or out.is_symlink()) and not overwrite:
        given = "the default output for this checkpoint, dtype and format" if is_default else "given as out="
        raise ValueError(f"export output {out} already exists ({given}); pass overwrite=true to replace it, "
                         f"or out=PATH to write elsewhere")
    parent = Path(os.path.abspath(out)).parent
    existing = next(p for p in [parent, *parent.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ValueError(f"cannot write the export to {out}: {existing} is not a directory; choose another out=PATH")
    if not os.access(existing, os.W_OK | os.X_OK):  # root passes this except on a read-only filesystem
        raise ValueError(f"cannot write the export to {out}: {existing} is not writable by this user; choose another out=PATH")


def _first_cause(error: BaseException) -> str:
    """The OS's reason behind a write failure: torch wraps it in a RuntimeError ("unexpected pos ...")
    whose __context__ holds the OSError; safetensors puts its errno in the message."""
    if (os_error := os_error_in(error)) is not None:
        return os_error.strerror
    text = str(error).strip()
    if errno := re.search(r"\(os error (\d+)\)", text):  # safetensors: "... I/O error: File too large (os error 27)"
        return os.strerror(int(errno.group(1)))
    return text.splitlines()[0][:300] if text else type(error).__name__


def save_export(state: dict[str, torch.Tensor], meta: dict, out: Path, fmt: ExportFormat) -> None:
    """Atomically: `out` is the old file or the new one, and a failed write leaves no temp file."""
    from safetensors import SafetensorError

    existed = out.exists()
    try:
        match fmt:
            case ExportFormat.torch:
                save_atomic({"model": state, "lmtrain": meta}, out)
            case ExportFormat.safetensors:
                from safetensors.torch import save_file

                tensors = {k: v.contiguous() for k, v in state.items()}
                write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata={"lmtrain": json.dumps(meta)}))
            case _:
                raise ValueError(f"format={fmt} is not one of {', '.join(f.name for f in ExportFormat)}")
    except (OSError, RuntimeError, SafetensorError) as e:
        left = f"{out} is unchanged" if existed else "no partial file was left"
        raise ValueError(f"could not write the export to {out}: {_first_cause(e)}; {left}") from e


def run(cfg: ExportConfig) -> Path:
    ckpt = Path(cfg.ckpt)
    detect_layout(ckpt)  # a missing or incomplete checkpoint is named before anything else
    out = Path(cfg.out) if cfg.out else default_out_path(ckpt, cfg.dtype, cfg.format)
    check_out_path(out, ckpt=ckpt, overwrite=cfg.overwrite, is_default=not cfg.out, directory=cfg.format is ExportFormat.hf)
    if cfg.format is ExportFormat.hf:
        from lmtrain.hf.export import export_hf

        return export_hf(ckpt, out, dtype=DTYPES[cfg.dtype], dtype_name=cfg.dtype, overwrite=cfg.overwrite,
                         check=cfg.check, check_atol=cfg.check_atol, max_shard_size=cfg.max_shard_size)
    state, run = export_state_dict(ckpt, DTYPES[cfg.dtype])
    meta = {"model_config": run.raw["model_config"], "lmtrain_version": run.version, "tokenizer_hash": run.tokenizer_hash,
            "eos_token": run.eos_token, "source": str(ckpt), "task": {"kind": run.kind.name, "label_names": run.label_names}}
    save_export(state, meta, out, cfg.format)
    n = sum(v.numel() for v in state.values())
    print(f"exported {len(state)} tensors ({n:,} values, {cfg.dtype}) from {ckpt} to {out}", flush=True)
    return out
