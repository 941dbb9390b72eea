"""Load a trained model and its tokenizer from a checkpoint, for `generate` and `eval`."""

from __future__ import annotations

import hashlib
from dataclasses import fields
from pathlib import Path

import torch

from lmtrain.checkpoint import CheckpointError, load_record, load_weights
from lmtrain.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from lmtrain.model.config import MLPKind, ModelConfig, Norm, Positional
from lmtrain.model.transformer import Transformer

_ENUMS = {"positional": Positional, "norm": Norm, "mlp": MLPKind}


def model_config_from_record(record: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    values = {k: (_ENUMS[k](v) if k in _ENUMS else v) for k, v in record.items() if k in known}
    return ModelConfig(**values)


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


def task_kind(record: dict) -> str:
    """The task a checkpoint was trained for (checkpoints from before tasks existed: causal_lm)."""
    return record.get("task", {}).get("kind", "causal_lm")


def load_model(ckpt_path: str | Path, device: str = "auto") -> tuple[Transformer, dict]:
    """The plain model of a checkpoint (weights only, eval mode) and the checkpoint's lmtrain record."""
    model, _, record = load_task_model(ckpt_path, device)
    return model, record


def load_task_model(ckpt_path: str | Path, device: str = "auto") -> tuple[Transformer, torch.nn.Module | None, dict]:
    """The model, the task head (classify, qa; else None), both in eval mode, and the lmtrain record."""
    from lmtrain.tasks.heads import LinearHead

    record = load_record(Path(ckpt_path))["lmtrain"]
    model_cfg = model_config_from_record(record["model_config"])
    model = Transformer(model_cfg)  # no init_weights(): every weight comes from the checkpoint
    weights = load_weights(Path(ckpt_path))
    head = None
    n_outputs = {"classify": len(record.get("task", {}).get("label_names", [])), "qa": 2}.get(task_kind(record))
    if n_outputs:
        head = LinearHead(model_cfg.d_model, n_outputs, dropout=0.0, init_std=model_cfg.init_std)
        head_state = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
        try:
            head.load_state_dict(head_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {ckpt_path} holds no complete {task_kind(record)} head: {e}") from e
        head = head.to(resolve_device(device)).eval()
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    if model_cfg.tied_embeddings:  # sharded layouts store a tied tensor once
        state.setdefault("lm_head.weight", state.get("tok_embeddings.weight"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt_path} does not match its own model config: {e}") from e
    return model.to(resolve_device(device)).eval(), head, record


def decode_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Generated ids as text, without the surrounding whitespace a byte-level BPE puts in front."""
    return tokenizer.decode(ids).strip()


def load_run_tokenizer(ckpt_path: str | Path, record: dict) -> Tokenizer:
    """The tokenizer saved in the run dir (runs/<run>/tokenizer), else the prepared data's; its hash
    must match the one recorded at training time."""
    ckpt_path = Path(ckpt_path).resolve()
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
