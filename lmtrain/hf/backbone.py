"""init_from=hf:<dir or hub id>: a Hugging Face model as the starting point of an lmtrain run.

The model config comes from the HF config.json (it wins over model=..., as a from_pretrained does),
the tokenizer from the directory's tokenizer.json, the weights from its safetensors (or .bin through
torch.load(weights_only=True)). Needs no `transformers`: training never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from torch import Tensor

from lmtrain.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from lmtrain.hf.convert import Family, family_of, from_hf_state, model_config_from_hf, unused_hf_tensors
from lmtrain.hf.files import load_config, load_hf_weights, resolve_model_dir
from lmtrain.model.config import ModelConfig

PREFIX = "hf:"
# The base-model prefix a bare HF base model (GPT2Model, LlamaModel, BertModel) saves its tensors without.
BASE_PREFIX = {Family.gpt2: "transformer.", Family.llama: "model.", Family.bert: "bert."}
# Heads sit beside the base model, never under its prefix.
HEAD_PREFIXES = ("lm_head.", "cls.", "classifier.", "qa_outputs.")


def hf_spec(init_from: str | None) -> str | None:
    """The <dir or hub id> of init_from=hf:<...>, else None (an lmtrain checkpoint, or nothing)."""
    if init_from and init_from.startswith(PREFIX):
        spec = init_from[len(PREFIX):]
        if not spec:
            raise ValueError("init_from=hf: names no model; give a local directory or hub id, e.g. init_from=hf:gpt2")
        return spec
    return None


@dataclass(frozen=True)
class HFBackbone:
    spec: str
    model_dir: Path
    model_cfg: ModelConfig
    tokenizer: Tokenizer

    def describe(self) -> str:
        """The derived model config, for the start-of-run line."""
        c = self.model_cfg
        return (f"init_from=hf:{self.spec}: model derived from {self.model_dir / 'config.json'} ({family_of(c).name}): "
                f"d_model={c.d_model} n_layers={c.n_layers} n_heads={c.n_heads} n_kv_heads={c.kv_heads} d_ff={c.ffn_dim} "
                f"vocab_size={c.vocab_size} max_seq_len={c.max_seq_len} tied_embeddings={c.tied_embeddings} "
                f"bias={c.bias} dropout={c.dropout} norm_eps={c.norm_eps}"
                + (f" rope_theta={c.rope_theta}" if family_of(c) is Family.llama else "")
                + (f" mlp={c.mlp.name} type_vocab_size={c.type_vocab_size} masked-LM head={c.lm_head_transform} (a "
                   "pooler or task head in the checkpoint is not loaded)" if family_of(c) is Family.bert else "")
                + "; model=... is not used")


@lru_cache(maxsize=4)
def load_hf_backbone(spec: str) -> HFBackbone:
    """Config and tokenizer of an HF model (weights are read later, by load_hf_state); ValueError naming
    the file for a missing file, an unsupported architecture or a tokenizer too big for the model."""
    model_dir = resolve_model_dir(spec)
    config = load_config(model_dir)
    model_cfg = model_config_from_hf(config, source=str(model_dir / "config.json"), name=f"hf-{Path(spec).name}")
    tokenizer_file = model_dir / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ValueError(f"{tokenizer_file} does not exist; lmtrain reads a model's tokenizer from its tokenizer.json "
                         "(write one with AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    tokenizer = load_tokenizer(tokenizer_file)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{tokenizer_file} has token ids up to {tokenizer.vocab_size - 1}, beyond vocab_size="
                         f"{model_cfg.vocab_size} of {model_dir / 'config.json'}: the tokenizer is not this model's")
    return HFBackbone(spec, model_dir, model_cfg, tokenizer)


def with_base_prefix(hf_state: dict[str, Tensor], family: Family) -> dict[str, Tensor]:
    """Names as the *ForCausalLM / *ForMaskedLM class has them: a base model's (`h.0...`, as the original
    gpt2 on the hub; `embeddings...` of a BertModel) get the base-model prefix, and the LayerNorm
    `gamma`/`beta` of early BERT checkpoints (as transformers renames them at load) are weight/bias."""
    prefix = BASE_PREFIX[family]
    named = {(k if k.startswith((prefix, *HEAD_PREFIXES)) else prefix + k): v for k, v in hf_state.items()}
    if family is Family.bert:
        renamed = {".LayerNorm.gamma": ".LayerNorm.weight", ".LayerNorm.beta": ".LayerNorm.bias"}
        named = {next((k.removesuffix(old) + new for old, new in renamed.items() if k.endswith(old)), k): v
                 for k, v in named.items()}
    return named


def load_hf_state(backbone: HFBackbone) -> dict[str, Tensor]:
    """The backbone's weights under lmtrain's `Transformer.state_dict()` names; ValueError naming the
    file and tensor that does not fit."""
    cfg = backbone.model_cfg
    hf_state = with_base_prefix(load_hf_weights(backbone.model_dir), family_of(cfg))
    source = f"the weights in {backbone.model_dir}"
    state = from_hf_state(hf_state, cfg, source=source)
    if unused := unused_hf_tensors(hf_state, cfg):
        raise ValueError(f"{source} hold tensor {unused[0]}" + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "")
                         + f", which a {family_of(cfg).name} model with this config.json does not have; the weights and "
                         "config.json do not belong together")
    return state
