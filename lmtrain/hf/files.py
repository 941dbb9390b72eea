"""Hugging Face model directories on disk: find one (local dir or hub id), read its config and weights,
write sharded safetensors. Loading never runs code from the directory: safetensors first, `.bin`
through `torch.load(weights_only=True)`, and no `trust_remote_code` anywhere."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# What an import needs from the hub, safetensors first (the .bin patterns are fetched only without them).
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "model.safetensors", "model-*.safetensors", SAFETENSORS_INDEX]
HUB_BIN_FILES = [BIN_FILE, "pytorch_model-*.bin", BIN_INDEX]


@lru_cache(maxsize=8)
def resolve_model_dir(spec: str) -> Path:
    """`spec` of init_from=hf:<spec>: a local directory, else a hub id fetched with huggingface_hub
    (cached in its usual cache; only config, tokenizer and weight files)."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if local.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:
        raise ValueError(f"init_from=hf:{spec}: no such directory; give a local Hugging Face model directory "
                         "(holding config.json) or a hub id such as gpt2 or org/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"init_from=hf:{spec} is not a local directory, and fetching it from the hub needs "
                         "huggingface_hub: pip install 'lmtrain[hf]'") from None
    try:
        path = Path(snapshot_download(spec, allow_patterns=HUB_FILES))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(spec, allow_patterns=[*HUB_FILES, *HUB_BIN_FILES]))
    except Exception as e:  # offline, unknown repo, gated model: huggingface_hub has a dozen error types
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ValueError(f"init_from=hf:{spec} is not a local directory and could not be fetched from the Hugging "
                         f"Face hub ({type(e).__name__}: {reason}); download it where the hub is reachable and give "
                         "its local directory: init_from=hf:/path/to/model") from e
    return path


def load_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {model_dir} is not a Hugging Face model directory "
                         "(save one with model.save_pretrained(dir))")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the download or save was damaged") from e


def _shard_files(model_dir: Path, index_name: str) -> list[Path]:
    index_path = model_dir / index_name
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} is not a weight index (no 'weight_map'): {e}") from e
    files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    if missing := [f for f in files if not f.is_file()]:
        raise ValueError(f"{index_path} names shard {missing[0]}, which does not exist: an incomplete download or copy")
    return files


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model directory: safetensors (single or sharded) before .bin."""
    for single, index in ((SAFETENSORS_FILE, SAFETENSORS_INDEX), (BIN_FILE, BIN_INDEX)):
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            return _shard_files(model_dir, index)
    raise ValueError(f"{model_dir} holds no weights: looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} "
                     f"and {BIN_INDEX} (found: {sorted(p.name for p in model_dir.iterdir())[:10]})")


def load_weight_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors and torch.load each raise their own types for a damaged file
        raise ValueError(f"weight file {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is truncated, "
                         "damaged, or (a .bin) holds more than tensors") from e


def load_hf_weights(model_dir: Path) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in weight_files(model_dir):
        state.update(load_weight_file(path))
    return state


def parse_size(text: str) -> int:
    """'5GB', '500MB', '200KB' or a number of bytes -> bytes (decimal units, as transformers uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise ValueError(f"max_shard_size={text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
    unit = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[match.group(2)]
    return int(float(match.group(1)) * unit)


def plan_shards(state: dict[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most max_shard_bytes (a bigger tensor gets one alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_hf_weights(state: dict[str, Tensor], directory: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the
    size; returns the file names written."""
    from safetensors.torch import save_file as save_private

    def save_file(tensors: dict[str, Tensor], path: str, metadata: dict) -> None:
        save_private(tensors, path, metadata=metadata)
        os.chmod(path, 0o666 & ~current_umask())  # safetensors creates 0600: a server run as another user could not read it

    shards = plan_shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(directory / SAFETENSORS_FILE), metadata={"format": "pt"})
        return [SAFETENSORS_FILE]
    weight_map, names = {}, []
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in shard}, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, SAFETENSORS_INDEX]
