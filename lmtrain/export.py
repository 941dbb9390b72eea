"""`lmtrain export`: any strategy's checkpoint -> one consolidated state dict (fp32 or bf16)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmtrain.checkpoint import load_record, load_weights
from lmtrain.checkpoint.io import save_atomic
from lmtrain.config import ExportConfig, ExportFormat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_state_dict(ckpt: Path, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """Plain model weights (names as in lmtrain.model.Transformer; a task head's as `head.*`) and
    the checkpoint's record."""
    record = load_record(ckpt)["lmtrain"]
    weights = load_weights(ckpt)
    state = {k.removeprefix("model."): v.to(dtype) if v.is_floating_point() else v
             for k, v in weights.items() if k.startswith(("model.", "head."))}
    if record["model_config"].get("tied_embeddings"):
        state.pop("lm_head.weight", None)  # stored once, as tok_embeddings.weight
    return state, record


def run(cfg: ExportConfig) -> Path:
    ckpt = Path(cfg.ckpt)
    state, record = export_state_dict(ckpt, DTYPES[cfg.dtype])
    suffix = ".safetensors" if cfg.format is ExportFormat.safetensors else ".pt"
    out = Path(cfg.out) if cfg.out else ckpt.parent.parent / f"export-{ckpt.resolve().name.removesuffix('.ckpt')}-{cfg.dtype}{suffix}"
    meta = {"model_config": record["model_config"], "lmtrain_version": record["version"],
            "tokenizer_hash": record["tokenizer_hash"], "eos_token": record.get("eos_token"), "source": str(ckpt),
            "task": record.get("task", {"kind": "causal_lm"})}
    match cfg.format:
        case ExportFormat.torch:
            save_atomic({"model": state, "lmtrain": meta}, out)
        case ExportFormat.safetensors:
            from safetensors.torch import save_file

            tmp = out.with_name(out.name + ".tmp")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"lmtrain": json.dumps(meta)})
            tmp.replace(out)
    n = sum(v.numel() for v in state.values())
    print(f"exported {len(state)} tensors ({n:,} values, {cfg.dtype}) from {ckpt} to {out}", flush=True)
    return out
