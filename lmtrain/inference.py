"""Inference helpers: the device to run on, the run's tokenizer, sampling text. Loading a trained
model is `lmtrain.trained.load_trained`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lmtrain.checkpoint import CheckpointError, resolve_checkpoint
from lmtrain.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from lmtrain.model.config import ModelConfig
from lmtrain.model.transformer import Transformer


def model_config_from_record(values: dict) -> ModelConfig:
    """A ModelConfig from the plain dict a checkpoint (or a preset YAML) holds."""
    from lmtrain.trained import typed

    return typed(ModelConfig, values)


def resolve_device(device: str) -> torch.device:
    """auto (a CUDA GPU when there is one), cpu, cuda or cuda:N; an unusable one is refused by name."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} but this machine has no usable CUDA GPU (torch {torch.__version__}, built "
                         f"with CUDA {torch.version.cuda}); use device=cpu or device=auto")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device={device} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def load_model(ckpt_path: str | Path, device: str = "auto") -> tuple[Transformer, dict]:
    """The plain Transformer of a checkpoint (eval mode) and the record as saved: `load_trained`'s
    model, for callers that need nothing else."""
    from lmtrain.trained import load_trained

    trained = load_trained(ckpt_path, device)
    return trained.model, trained.run.raw


def decode_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Generated ids as text, without the surrounding whitespace a byte-level BPE puts in front."""
    return tokenizer.decode(ids).strip()


def load_run_tokenizer(ckpt_path: str | Path, record: dict) -> Tokenizer:
    """The tokenizer saved in the run dir (runs/<run>/tokenizer), else the prepared data's; its hash
    must match the one recorded at training time."""
    ckpt_path = resolve_checkpoint(ckpt_path).resolve()
    candidates = [ckpt_path.parent.parent / "tokenizer" / TOKENIZER_FILE, Path(record.get("data_dir") or ".") / TOKENIZER_FILE]
    for path in candidates:
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != record["tokenizer_hash"]:
                raise CheckpointError(
                    f"tokenizer {path} (sha256 {digest[:12]}) is not the one checkpoint {ckpt_path} was trained with "
                    f"({record['tokenizer_hash'][:12]})"
                )
            return load_tokenizer(path, eos_token=record.get("eos_token"))
    raise CheckpointError(
        f"no tokenizer for checkpoint {ckpt_path}: looked for {', '.join(str(p) for p in candidates)}"
    )


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, *, temperature: float = 0.8, top_k: int | None = 50,
                top_p: float | None = None, seed: int = 0, strict: bool = False) -> str:
    """Decoded continuation of `prompt` ('' = from a document boundary). strict=False shortens
    max_new_tokens to fit the model's context (the end-of-training sample); strict=True lets
    generate() refuse a request that does not fit, with the numbers."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    budget = max_new_tokens if strict else min(max_new_tokens, model.cfg.max_seq_len - idx.shape[1])
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, budget, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=tokenizer.eos_id, generator=generator)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return prompt + continuation_text(tokenizer, ids if prompt else [], new)


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt. A word-level tokenizer decodes words joined by spaces, so
    the continuation is what decoding the whole adds to the prompt's decoding (the space between the
    last prompt word and the first new one included, and a prompt word outside the vocabulary shown
    as the user wrote it, not as <unk>); byte-level tokenizers decode each part alike."""
    if not prompt_ids or not new_ids:
        return tokenizer.decode(new_ids)
    before, whole = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(new_ids)
