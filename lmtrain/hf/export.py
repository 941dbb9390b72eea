"""`lmtrain export format=hf`: a checkpoint of any layout -> a Hugging Face model directory, checked.

Writes config.json, generation_config.json, model.safetensors (or shards + index above
max_shard_size) and the run's tokenizer (tokenizer.json + tokenizer_config.json naming eos, bos,
pad, mask). The directory is built beside its destination and renamed into place, so `out` is
the old export or the new one. Then, unless check=false, transformers loads it (no remote code)
and its fp32 logits on a fixed input are compared with lmtrain's: above check_atol the export
fails, and the directory is left for inspection.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lmtrain.checkpoint import CheckpointError
from lmtrain.data.tokenizers import TOKENIZER_CONFIG_FILE, Tokenizer
from lmtrain.hf.convert import Family, family_of, hf_config, to_hf_state
from lmtrain.hf.files import parse_size, save_hf_weights
from lmtrain.model.config import Attention, ModelConfig
from lmtrain.model.transformer import Transformer
from lmtrain.trained import RunRecord

CHECK_SEQ_LEN = 32
CHECK_BATCH = 2


def require_transformers():
    """The `transformers` module, or a ValueError saying how to install it (it is an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("this needs the transformers package, which lmtrain does not install by default: "
                         "pip install 'lmtrain[hf]' (or check=false to export without the logit check)") from None
    return transformers


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """An export directory is only ever written where nothing is, or over an earlier HF export
    (config.json present) with overwrite=true: a user's other folder is never replaced."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"export out={out} exists and is not a directory; format=hf writes a directory: "
                         "choose another out=DIR")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise ValueError(f"export out={out} is a non-empty directory that is not a Hugging Face export (no "
                             "config.json); it is not replaced, not even with overwrite=true: choose another out=DIR")
        if not overwrite:
            raise ValueError(f"export output {out} already exists; pass overwrite=true to replace it, "
                             "or out=DIR to write elsewhere")


def model_and_task(ckpt: Path) -> tuple[ModelConfig, RunRecord]:
    """The checkpoint's model config and record, refused before any weight is read when no HF class
    computes them."""
    from lmtrain.trained import read_record

    record = read_record(ckpt)
    model_cfg = record.model
    lm_task = "masked_lm" if family_of(model_cfg) is Family.bert else "causal_lm"
    if (kind := record.kind.name) != lm_task:
        raise ValueError(f"checkpoint {ckpt} is a task={kind} model; format=hf exports causal_lm checkpoints (GPT-2, "
                         "Llama) and masked_lm ones (BERT). A task head has no exact HF class yet (lmtrain's classification head has a bias, the "
                         "HF *ForSequenceClassification score layer has none); use format=safetensors")
    return model_cfg, record


def special_ids(tokenizer: Tokenizer, family: Family) -> dict[str, int | None]:
    found = tokenizer.special_token_ids()
    if family is Family.bert:  # an encoder's sequences start with <|bos|> ([CLS] in a BERT tokenizer)
        return {"eos_id": tokenizer.eos_id, "bos_id": found.get("<|bos|>"), "pad_id": found.get("<|pad|>")}
    # bos is eos (GPT-2's convention): an lmtrain causal LM reads every document after an eos and never
    # sees <|bos|> (reserved for encoder tasks). lm-eval and others put bos in front of a text: it must
    # be the token the model knows as a document start.
    return {"eos_id": tokenizer.eos_id, "bos_id": tokenizer.eos_id, "pad_id": found.get("<|pad|>")}


def write_tokenizer(tokenizer: Tokenizer, directory: Path, max_seq_len: int, family: Family) -> None:
    """tokenizer.json + tokenizer_config.json; for a decoder bos is eos, as in config.json (see special_ids)."""
    tokenizer.save(directory)
    path = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(path.read_text())
    if family is not Family.bert:
        config["bos_token"] = tokenizer.eos_token
    config["model_max_length"] = max_seq_len
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_hf_dir(directory: Path, hf_state: dict, model_cfg: ModelConfig, tokenizer: Tokenizer, *, dtype: str,
                 max_shard_bytes: int) -> list[str]:
    family = family_of(model_cfg)
    ids = special_ids(tokenizer, family)
    config = hf_config(model_cfg, **ids, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if family is not Family.bert:  # an encoder does not generate
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(tokenizer, directory, model_cfg.max_seq_len, family)
    return save_hf_weights(hf_state, directory, max_shard_bytes)


def replace_dir(out: Path, write) -> None:
    """`write(tmp)` fills a fresh directory beside `out`, which then takes `out`'s place; on failure
    `out` is as it was and the temp directory is gone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp-{os.getpid()}"), out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def lmtrain_reference(state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> Transformer:
    """lmtrain's model with exactly the exported weights (their dtype), in fp32 and eval mode."""
    model = Transformer(model_cfg)
    state = {k: v.float() for k, v in state.items()}
    if model_cfg.tied_embeddings:
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_input(model_cfg: ModelConfig) -> torch.Tensor:
    """The fixed input of the check: ids over the whole real vocabulary, (CHECK_BATCH, T) int64."""
    generator = torch.Generator().manual_seed(0)
    seq_len = min(CHECK_SEQ_LEN, model_cfg.max_seq_len)
    ids = torch.randint(0, model_cfg.vocab_size, (CHECK_BATCH, seq_len), generator=generator)
    if model_cfg.attention is Attention.document:  # one document: what transformers' causal attention computes
        ids[ids == model_cfg.eos_id] = (model_cfg.eos_id + 1) % model_cfg.vocab_size
    return ids


def load_hf_model(directory: Path, family: Family):
    """The exported directory through transformers' own Auto class in fp32; refused if any tensor was
    missing or left over (transformers would only warn and initialise it randomly)."""
    transformers = require_transformers()
    auto = transformers.AutoModelForMaskedLM if family is Family.bert else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(
        directory, trust_remote_code=False, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"transformers loaded {directory} with {problems}; the export is broken (a bug in lmtrain's "
                         "conversion): please report it")
    return model.float().eval()


def compute_max_logit_diff(directory: Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig) -> float:
    """max |logits_hf - logits_lmtrain| over the real vocabulary on `check_input`, both in fp32."""
    ids = check_input(model_cfg)
    with torch.no_grad():
        ours = lmtrain_reference(state, model_cfg)(ids)[..., : model_cfg.vocab_size]
        theirs = load_hf_model(directory, family_of(model_cfg))(ids).logits.float()
    if theirs.shape != ours.shape:
        raise ValueError(f"transformers' logits have shape {tuple(theirs.shape)}, lmtrain's {tuple(ours.shape)}")
    return (theirs - ours).abs().max().item()


def export_hf(ckpt: Path, out: Path, *, dtype: torch.dtype, dtype_name: str, overwrite: bool, check: bool,
              check_atol: float, max_shard_size: str) -> Path:
    from lmtrain.export import export_state_dict
    from lmtrain.inference import load_run_tokenizer

    max_shard_bytes = parse_size(max_shard_size)  # out was checked by lmtrain.export.check_out_path
    model_cfg, record = model_and_task(ckpt)
    if model_cfg.attention is Attention.document:
        print("note: this model was trained with model.attention=document; transformers attends across an eos, so the "
              "export computes lmtrain's logits for text holding no eos (one document), as generation from a prompt does",
              flush=True)
    tokenizer = load_run_tokenizer(ckpt, record.raw)
    if check:
        require_transformers()  # before the weights are read and written, not after
    state, _ = export_state_dict(ckpt, dtype)
    try:
        hf_state = to_hf_state(state, model_cfg)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {e}") from e
    files: list[str] = []
    replace_dir(out, lambda tmp: files.extend(write_hf_dir(tmp, hf_state, model_cfg, tokenizer, dtype=dtype_name,
                                                           max_shard_bytes=max_shard_bytes)))
    size = sum((out / f).stat().st_size for f in files)
    print(f"exported {family_of(model_cfg).name} model ({len(hf_state)} tensors, {dtype_name}, {size / 1e6:.1f} MB in "
          f"{len(files)} file(s)) from {ckpt} to {out}", flush=True)
    if check:
        diff = compute_max_logit_diff(out, state, model_cfg)
        print(f"check: transformers vs lmtrain fp32 logits on a fixed {CHECK_BATCH}x{check_input(model_cfg).shape[1]} "
              f"input: max abs difference {diff:.3g} (tolerance {check_atol:g})", flush=True)
        if not diff <= check_atol:  # NaN fails too
            raise ValueError(f"the export in {out} does not compute lmtrain's logits: max abs difference {diff:.3g} > "
                             f"check_atol={check_atol:g}; do not use it (and please report it: the conversion is wrong)")
    return out
