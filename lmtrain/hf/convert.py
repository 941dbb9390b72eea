"""lmtrain <-> Hugging Face: which model shapes map, their config.json, and tensor names both ways.

Pure functions over plain dicts and tensors (torch only; `transformers` is never imported here).
Two families map exactly:
- GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, tanh-GELU MLP, no GQA. lmtrain's GELU is
  `F.gelu(approximate="tanh")`, which is transformers' `gelu_pytorch_tanh` to the bit (GPT-2's own
  `gelu_new` writes the same formula out in Python and differs by rounding, ~1e-7). GPT-2's
  Conv1D stores weights (in, out): the transpose of `nn.Linear`'s.
- Llama (`LlamaForCausalLM`): RoPE, RMSNorm, SwiGLU, GQA. lmtrain's RoPE pairs x[i] with
  x[i + D/2] (rotate-half), as HF Llama does, so q/k rows are not permuted; the fused qkv rows are
  [q heads | k heads | v heads] and split into q_proj, k_proj, v_proj as they are.
- BERT (`BertForMaskedLM`, an encoder): see `lmtrain.hf.bert`; qkv splits into query, key, value.

Vocabulary: lmtrain pads its embedding and lm head to `padded_vocab_size` rows; the export keeps
only the real `vocab_size` rows (HF vocab_size = the tokenizer's), so HF logits are lmtrain's over
the real vocabulary and no HF code ever sees a padding id. An import sets pad_vocab_multiple=1: the
model has exactly the HF rows, so its loss over the whole vocabulary is HF's (a zero padding row
would give logit 0 against GPT-2's logits of about -100 and take most of the softmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from lmtrain.hf import bert
from lmtrain.model.config import MLPKind, ModelConfig, Norm, Positional


class Family(Enum):
    gpt2 = "gpt2"
    llama = "llama"
    bert = "bert"


ARCHITECTURES = {Family.gpt2: "GPT2LMHeadModel", Family.llama: "LlamaForCausalLM", Family.bert: "BertForMaskedLM"}
WHAT_MAPS = ("GPT2LMHeadModel (causal, pre_norm, positional=learned, norm=layernorm, mlp=gelu, n_kv_heads=n_heads), "
             "LlamaForCausalLM (causal, pre_norm, positional=rope, norm=rmsnorm, mlp=swiglu), both without "
             "embedding_scale, and BertForMaskedLM (the bert_base preset's shape: causal=false, pre_norm=false, "
             "positional=learned, norm=layernorm, mlp=gelu_exact or gelu, bias, tied_embeddings, embedding_norm, "
             "type_vocab_size>0, lm_head_transform, lm_head_bias)")
# Tensors some HF checkpoints carry that are buffers recomputed at load (causal masks, rotary frequencies).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", "rotary_emb.inv_freq")


def family_of(cfg: ModelConfig) -> Family:
    """The HF family that computes this model exactly; ValueError listing what maps otherwise."""
    shape = {"causal": cfg.causal, "pre_norm": cfg.pre_norm, "embedding_scale": cfg.embedding_scale}
    if bert.is_bert(cfg):
        return Family.bert
    extras = not (cfg.embedding_norm or cfg.type_vocab_size or cfg.lm_head_transform or cfg.lm_head_bias)
    if cfg.causal and cfg.pre_norm and not cfg.embedding_scale and extras:
        if (cfg.positional, cfg.norm, cfg.mlp) == (Positional.learned, Norm.layernorm, MLPKind.gelu):
            if cfg.kv_heads == cfg.n_heads:
                return Family.gpt2
        if (cfg.positional, cfg.norm, cfg.mlp) == (Positional.rope, Norm.rmsnorm, MLPKind.swiglu):
            return Family.llama
    shape |= {"bias": cfg.bias, "embedding_norm": cfg.embedding_norm, "type_vocab_size": cfg.type_vocab_size,
              "lm_head_transform": cfg.lm_head_transform, "lm_head_bias": cfg.lm_head_bias}
    seen = ", ".join([f"positional={cfg.positional.name}", f"norm={cfg.norm.name}", f"mlp={cfg.mlp.name}",
                      f"n_kv_heads={cfg.kv_heads}/n_heads={cfg.n_heads}", *(f"{k}={v}" for k, v in shape.items())])
    raise ValueError(f"model {cfg.name} ({seen}) is computed exactly by no Hugging Face class; format=hf maps "
                     f"{WHAT_MAPS}. Use format=safetensors for lmtrain's own weights")


# -- config.json ----------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int, pad_id: int | None, dtype: str) -> dict:
    """config.json for the HF class of `family_of(cfg)`; vocab_size is the real (unpadded) one."""
    common = {"architectures": [ARCHITECTURES[family_of(cfg)]], "vocab_size": cfg.vocab_size,
              "bos_token_id": eos_id if bos_id is None else bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
              "tie_word_embeddings": cfg.tied_embeddings, "initializer_range": cfg.init_std, "dtype": dtype,
              "torch_dtype": dtype, "use_cache": True}
    match family_of(cfg):
        case Family.gpt2:
            return {"model_type": "gpt2", **common, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
                    "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim,
                    "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": cfg.norm_eps,
                    "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                    "reorder_and_upcast_attn": False}
        case Family.llama:
            return {"model_type": "llama", **common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
                    "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                    "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
                    "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                    # transformers 5 reads rope_parameters, 4.x (and vLLM's older readers) rope_theta
                    "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                    "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
                    "pretraining_tp": 1}
        case Family.bert:
            if not bert.has_masked_lm_head(cfg):
                raise ValueError(f"model {cfg.name} is BERT's encoder without its masked-LM head (lm_head_transform=false), "
                                 "which BertForMaskedLM always has; format=hf exports encoders trained with "
                                 "lm_head_transform=true lm_head_bias=true (as bert_base); use format=safetensors")
            return bert.bert_hf_config(cfg, common)
    raise AssertionError("family_of returned an unknown family")


def _unsupported(source: str, what: str, value: object, fix: str = "") -> ValueError:
    return ValueError(f"{source}: {what}={value!r} has no exact counterpart in lmtrain's model{fix}")


def model_config_from_hf(config: dict, *, source: str, name: str) -> ModelConfig:
    """The lmtrain ModelConfig that computes what an HF config.json describes; ValueError naming the
    first setting lmtrain's model cannot reproduce."""
    model_type = config.get("model_type")
    match model_type:
        case "gpt2":
            return _gpt2_model_config(config, source=source, name=name)
        case "llama":
            return _llama_model_config(config, source=source, name=name)
        case "bert":
            return bert.bert_model_config(config, source=source, name=name)
    raise ValueError(f"{source}: model_type={model_type!r} (architectures {config.get('architectures')}) is not one "
                     f"lmtrain imports; init_from=hf: reads model_type gpt2 (GPT2LMHeadModel), llama (LlamaForCausalLM) "
                     "and bert (BertForMaskedLM, BertModel)")


def _gpt2_model_config(config: dict, *, source: str, name: str) -> ModelConfig:
    activation = config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise _unsupported(source, "activation_function", activation, " (lmtrain's gelu is the tanh approximation)")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if config.get(key):
            raise _unsupported(source, key, config[key])
    if config.get("scale_attn_weights", True) is False:
        raise _unsupported(source, "scale_attn_weights", False)
    d_model = config.get("n_embd", 768)
    return ModelConfig(
        name=name, vocab_size=config.get("vocab_size", 50257), pad_vocab_multiple=1, d_model=d_model,
        n_layers=config.get("n_layer", 12), n_heads=config.get("n_head", 12), d_ff=config.get("n_inner") or 4 * d_model,
        max_seq_len=config.get("n_positions", 1024), positional=Positional.learned, norm=Norm.layernorm,
        mlp=MLPKind.gelu, tied_embeddings=config.get("tie_word_embeddings", True), bias=True,
        dropout=float(config.get("resid_pdrop", 0.1)), pre_norm=True, norm_eps=config.get("layer_norm_epsilon", 1e-5),
        causal=True, init_std=config.get("initializer_range", 0.02))


def _rope_theta(config: dict, source: str) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise _unsupported(source, "rope_type", kind, " (lmtrain's RoPE has no frequency scaling)")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _llama_model_config(config: dict, *, source: str, name: str) -> ModelConfig:
    if (act := config.get("hidden_act", "silu")) != "silu":
        raise _unsupported(source, "hidden_act", act, " (lmtrain's swiglu gates with silu)")
    if config.get("attention_bias", False) != config.get("mlp_bias", False):
        raise _unsupported(source, "attention_bias/mlp_bias", (config.get("attention_bias"), config.get("mlp_bias")),
                           " (lmtrain's model.bias covers attention and MLP together)")
    d_model, n_heads = config.get("hidden_size", 4096), config.get("num_attention_heads", 32)
    if (head_dim := config.get("head_dim")) not in (None, d_model // n_heads):
        raise _unsupported(source, "head_dim", head_dim, f" (lmtrain's is hidden_size / num_attention_heads = {d_model // n_heads})")
    return ModelConfig(
        name=name, vocab_size=config.get("vocab_size", 32000), pad_vocab_multiple=1, d_model=d_model,
        n_layers=config.get("num_hidden_layers", 32), n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, d_ff=config.get("intermediate_size", 11008),
        max_seq_len=config.get("max_position_embeddings", 2048), positional=Positional.rope, norm=Norm.rmsnorm,
        mlp=MLPKind.swiglu, tied_embeddings=config.get("tie_word_embeddings", False),
        bias=bool(config.get("attention_bias", False)), dropout=float(config.get("attention_dropout", 0.0)),
        pre_norm=True, rope_theta=_rope_theta(config, source), norm_eps=config.get("rms_norm_eps", 1e-6), causal=True,
        init_std=config.get("initializer_range", 0.02))


# -- tensors --------------------------------------------------------------------------------------


class Op(Enum):
    copy = "copy"
    transpose = "transpose"  # GPT-2's Conv1D: (in, out)
    split = "split"  # one lmtrain tensor <-> several HF ones, along dim 0
    vocab = "vocab"  # lmtrain's padded rows <-> HF's real rows


@dataclass(frozen=True)
class Link:
    """lmtrain tensor `lm` <-> HF tensors `hf`. `shape` is the lmtrain tensor's; a bias lmtrain does not
    have (model.bias=false) is exported as zeros when the HF class always has one."""

    lm: str
    hf: tuple[str, ...]
    op: Op
    shape: tuple[int, ...]
    sizes: tuple[int, ...] = ()
    zeros_if_absent: bool = False


def links(cfg: ModelConfig) -> list[Link]:
    """Every tensor of the HF model, tied lm head not counted, and where it comes from in lmtrain's."""
    match family_of(cfg):
        case Family.gpt2:
            return _gpt2_links(cfg)
        case Family.llama:
            return _llama_links(cfg)
        case Family.bert:
            return _bert_links(cfg)
    raise AssertionError("family_of returned an unknown family")


def _vocab_links(cfg: ModelConfig, embed: str, head: str) -> list[Link]:
    rows = (cfg.padded_vocab_size, cfg.d_model)
    out = [Link("tok_embeddings.weight", (embed,), Op.vocab, rows)]
    if not cfg.tied_embeddings:
        out.append(Link("lm_head.weight", (head,), Op.vocab, rows))
    return out


def _gpt2_links(cfg: ModelConfig) -> list[Link]:
    d, ff = cfg.d_model, cfg.ffn_dim
    out = [*_vocab_links(cfg, "transformer.wte.weight", "lm_head.weight"),
           Link("pos_embeddings.weight", ("transformer.wpe.weight",), Op.copy, (cfg.max_seq_len, d))]
    absent = not cfg.bias
    for i in range(cfg.n_layers):
        lm, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for lm_name, hf_name, op, shape in [
            ("attn_norm", "ln_1", Op.copy, (d,)), ("attn.qkv", "attn.c_attn", Op.transpose, (3 * d, d)),
            ("attn.out_proj", "attn.c_proj", Op.transpose, (d, d)), ("mlp_norm", "ln_2", Op.copy, (d,)),
            ("mlp.up", "mlp.c_fc", Op.transpose, (ff, d)), ("mlp.down", "mlp.c_proj", Op.transpose, (d, ff)),
        ]:
            out.append(Link(f"{lm}{lm_name}.weight", (f"{hf}{hf_name}.weight",), op, shape))
            out.append(Link(f"{lm}{lm_name}.bias", (f"{hf}{hf_name}.bias",), Op.copy, shape[:1], zeros_if_absent=absent))
    out += [Link("norm.weight", ("transformer.ln_f.weight",), Op.copy, (d,)),
            Link("norm.bias", ("transformer.ln_f.bias",), Op.copy, (d,), zeros_if_absent=absent)]
    return out


def _llama_links(cfg: ModelConfig) -> list[Link]:
    d, ff, q, kv = cfg.d_model, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = _vocab_links(cfg, "model.embed_tokens.weight", "lm_head.weight")
    for i in range(cfg.n_layers):
        lm, hf = f"blocks.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{hf}self_attn.{p}_proj" for p in "qkv")
        params = [("weight", lambda rows, cols: (rows, cols))] + ([("bias", lambda rows, cols: (rows,))] if cfg.bias else [])
        for p, shape in params:
            out += [Link(f"{lm}attn.qkv.{p}", tuple(f"{n}.{p}" for n in qkv), Op.split, shape(q + 2 * kv, d), (q, kv, kv)),
                    Link(f"{lm}attn.out_proj.{p}", (f"{hf}self_attn.o_proj.{p}",), Op.copy, shape(d, q)),
                    Link(f"{lm}mlp.gate.{p}", (f"{hf}mlp.gate_proj.{p}",), Op.copy, shape(ff, d)),
                    Link(f"{lm}mlp.up.{p}", (f"{hf}mlp.up_proj.{p}",), Op.copy, shape(ff, d)),
                    Link(f"{lm}mlp.down.{p}", (f"{hf}mlp.down_proj.{p}",), Op.copy, shape(d, ff))]
        out += [Link(f"{lm}attn_norm.weight", (f"{hf}input_layernorm.weight",), Op.copy, (d,)),
                Link(f"{lm}mlp_norm.weight", (f"{hf}post_attention_layernorm.weight",), Op.copy, (d,))]
    out.append(Link("norm.weight", ("model.norm.weight",), Op.copy, (d,)))
    return out


def _bert_links(cfg: ModelConfig) -> list[Link]:
    d, ff = cfg.d_model, cfg.ffn_dim
    # tied always (bert.is_bert): the decoder is the word embedding
    out = [Link("tok_embeddings.weight", ("bert.embeddings.word_embeddings.weight",), Op.vocab, (cfg.padded_vocab_size, d)),
           Link("pos_embeddings.weight", ("bert.embeddings.position_embeddings.weight",), Op.copy, (cfg.max_seq_len, d)),
           Link("type_embeddings.weight", ("bert.embeddings.token_type_embeddings.weight",), Op.copy,
                (cfg.type_vocab_size, d))]
    pairs = [("embed_norm", "bert.embeddings.LayerNorm", (d,))]
    for i in range(cfg.n_layers):
        lm, hf = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        qkv = tuple(f"{hf}attention.self.{p}" for p in ("query", "key", "value"))
        out += [Link(f"{lm}attn.qkv.weight", tuple(f"{n}.weight" for n in qkv), Op.split, (3 * d, d), (d, d, d)),
                Link(f"{lm}attn.qkv.bias", tuple(f"{n}.bias" for n in qkv), Op.split, (3 * d,), (d, d, d))]
        pairs += [(f"{lm}attn.out_proj", f"{hf}attention.output.dense", (d, d)),
                  (f"{lm}attn_norm", f"{hf}attention.output.LayerNorm", (d,)),
                  (f"{lm}mlp.up", f"{hf}intermediate.dense", (ff, d)), (f"{lm}mlp.down", f"{hf}output.dense", (d, ff)),
                  (f"{lm}mlp_norm", f"{hf}output.LayerNorm", (d,))]
    if bert.has_masked_lm_head(cfg):
        pairs += [("lm_head_transform.dense", "cls.predictions.transform.dense", (d, d)),
                  ("lm_head_transform.norm", "cls.predictions.transform.LayerNorm", (d,))]
        out.append(Link("lm_head.bias", ("cls.predictions.bias",), Op.vocab, (cfg.padded_vocab_size,)))
    for lm_name, hf_name, shape in pairs:  # a weight and a bias each
        out += [Link(f"{lm_name}.weight", (f"{hf_name}.weight",), Op.copy, shape),
                Link(f"{lm_name}.bias", (f"{hf_name}.bias",), Op.copy, shape[:1])]
    return out


def hf_shapes(link: Link, vocab_size: int) -> list[tuple[int, ...]]:
    """The shapes of `link.hf`'s tensors."""
    match link.op:
        case Op.copy:
            return [link.shape]
        case Op.transpose:
            return [link.shape[::-1]]
        case Op.split:
            return [(size, *link.shape[1:]) for size in link.sizes]
        case Op.vocab:
            return [(vocab_size, *link.shape[1:])]
    raise AssertionError(f"unknown op {link.op}")


def to_hf_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """lmtrain weights (names of `Transformer.state_dict()`, tied head stored once or twice) -> HF's."""
    out: dict[str, Tensor] = {}
    for link in links(cfg):
        if link.lm not in state:
            if not link.zeros_if_absent:
                raise ValueError(f"the checkpoint has no tensor {link.lm}, which {link.hf[0]} is made from")
            out[link.hf[0]] = torch.zeros(link.shape, dtype=state["tok_embeddings.weight"].dtype)
            continue
        tensor = state[link.lm]
        match link.op:
            case Op.copy:
                pieces = [tensor]
            case Op.transpose:
                pieces = [tensor.T]
            case Op.split:
                pieces = list(tensor.split(link.sizes, dim=0))
            case Op.vocab:
                pieces = [tensor[: cfg.vocab_size]]
        out.update((name, piece.contiguous()) for name, piece in zip(link.hf, pieces))
    return out


def from_hf_state(hf_state: dict[str, Tensor], cfg: ModelConfig, *, source: str) -> dict[str, Tensor]:
    """HF weights (full names, e.g. `transformer.h.0...`) -> lmtrain's `Transformer.state_dict()` names
    (tied head included). ValueError naming the first missing tensor or wrong shape."""
    out: dict[str, Tensor] = {}
    for link in links(cfg):
        tensors = []
        for name, shape in zip(link.hf, hf_shapes(link, cfg.vocab_size)):
            if name not in hf_state:
                raise ValueError(f"{source} has no tensor {name}, which its config.json implies; the weights and "
                                 "config.json do not belong together")
            if tuple(hf_state[name].shape) != shape:
                raise ValueError(f"{source}: tensor {name} has shape {tuple(hf_state[name].shape)}, but config.json "
                                 f"implies {shape}; the weights and config.json do not belong together")
            tensors.append(hf_state[name])
        match link.op:
            case Op.copy:
                out[link.lm] = tensors[0]
            case Op.transpose:
                out[link.lm] = tensors[0].T.contiguous()
            case Op.split:
                out[link.lm] = torch.cat(tensors, dim=0)
            case Op.vocab:
                padded = tensors[0].new_zeros(link.shape)
                padded[: cfg.vocab_size] = tensors[0]
                out[link.lm] = padded
    if cfg.tied_embeddings:
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    return out


def unused_hf_tensors(hf_state: dict[str, Tensor], cfg: ModelConfig) -> list[str]:
    """Names in an HF checkpoint that no lmtrain tensor is made from (recomputed buffers and a tied
    head excepted)."""
    used = {name for link in links(cfg) for name in link.hf}
    if cfg.tied_embeddings:
        used |= {"lm_head.weight", "cls.predictions.decoder.weight"}
    left_out = bert.is_not_loaded if family_of(cfg) is Family.bert else lambda name: False
    return sorted(k for k in hf_state if k not in used and not k.endswith(IGNORED_SUFFIXES) and not left_out(k))
