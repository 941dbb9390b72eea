"""BERT (`BertForMaskedLM`, `BertModel`) <-> lmtrain's encoder: which lmtrain configs are BERT, and
config.json both ways. Tensor names are in `convert`, with the other families'.

BERT is lmtrain's encoder (causal=false) with every BERT option on: post-norm blocks, learned
absolute positions, token-type embeddings and a LayerNorm on the summed embeddings, biases, GELU
(BERT's hidden_act "gelu" is the exact erf form: mlp=gelu_exact; "gelu_pytorch_tanh" is lmtrain's
gelu), and the masked-LM head (lm_head_transform + lm_head_bias). A checkpoint without that head
(BertModel, BertForSequenceClassification) imports as the backbone with a plain tied lm head; its
pooler and task head are not loaded (lmtrain's task heads start fresh).
"""

from __future__ import annotations

from lmtrain.model.config import MLPKind, ModelConfig, Norm, Positional

MASKED_LM_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")
# hidden_act -> lmtrain's MLP kind (each computes the same function; gelu_new writes the tanh form out in
# Python and differs from torch's by rounding, ~1e-7)
ACTIVATIONS = {"gelu": MLPKind.gelu_exact, "gelu_pytorch_tanh": MLPKind.gelu, "gelu_new": MLPKind.gelu,
               "relu": MLPKind.relu}
HIDDEN_ACT = {MLPKind.gelu_exact: "gelu", MLPKind.gelu: "gelu_pytorch_tanh", MLPKind.relu: "relu"}
# Tensors of BERT checkpoints an import leaves out: the pooler and task heads (lmtrain's heads are its
# own), buffers, and the decoder's copies of tied tensors.
NOT_LOADED_PREFIXES = ("bert.pooler.", "classifier.", "cls.seq_relationship.", "qa_outputs.")
NOT_LOADED_NAMES = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "cls.predictions.decoder.bias")


def is_bert(cfg: ModelConfig) -> bool:
    """Whether BERT's encoder computes this model (the masked-LM head aside: see `has_masked_lm_head`)."""
    return (not cfg.causal and not cfg.pre_norm and not cfg.embedding_scale and cfg.positional is Positional.learned
            and cfg.norm is Norm.layernorm and cfg.mlp in HIDDEN_ACT and cfg.bias and cfg.embedding_norm
            and cfg.type_vocab_size > 0 and cfg.kv_heads == cfg.n_heads and cfg.tied_embeddings
            and cfg.lm_head_transform == cfg.lm_head_bias)


def has_masked_lm_head(cfg: ModelConfig) -> bool:
    return cfg.lm_head_transform and cfg.lm_head_bias


def _unsupported(source: str, what: str, value: object, fix: str) -> ValueError:
    return ValueError(f"{source}: {what}={value!r} has no exact counterpart in lmtrain's encoder{fix}")


def bert_model_config(config: dict, *, source: str, name: str) -> ModelConfig:
    """The lmtrain ModelConfig of a BERT config.json; ValueError naming the first setting lmtrain's
    encoder cannot reproduce."""
    if (kind := config.get("position_embedding_type", "absolute")) != "absolute":
        raise _unsupported(source, "position_embedding_type", kind, " (lmtrain's learned positions are BERT's "
                           "absolute ones; relative_key and relative_key_query are not implemented)")
    for key in ("is_decoder", "add_cross_attention"):
        if config.get(key):
            raise _unsupported(source, key, config[key], " (lmtrain imports BERT as a bidirectional encoder)")
    if (act := config.get("hidden_act", "gelu")) not in ACTIVATIONS:
        raise _unsupported(source, "hidden_act", act, f" (lmtrain maps {sorted(ACTIVATIONS)})")
    if config.get("tie_word_embeddings", True) is False:
        # untied, BertForMaskedLM's decoder uses its own bias (cls.predictions.decoder.bias), not the shared one
        raise _unsupported(source, "tie_word_embeddings", False, " (lmtrain maps BERT with its decoder tied to the word "
                           "embeddings, as BERT's own checkpoints are)")
    if (types := config.get("type_vocab_size", 2)) < 1:
        raise _unsupported(source, "type_vocab_size", types, " (BERT adds a token-type embedding; it needs >= 1)")
    head = any(arch in MASKED_LM_ARCHITECTURES for arch in config.get("architectures") or ["BertForMaskedLM"])
    return ModelConfig(
        name=name, vocab_size=config.get("vocab_size", 30522), pad_vocab_multiple=1,
        d_model=config.get("hidden_size", 768), n_layers=config.get("num_hidden_layers", 12),
        n_heads=config.get("num_attention_heads", 12), d_ff=config.get("intermediate_size", 3072),
        max_seq_len=config.get("max_position_embeddings", 512), positional=Positional.learned, norm=Norm.layernorm,
        mlp=ACTIVATIONS[act], tied_embeddings=True, bias=True,
        dropout=float(config.get("hidden_dropout_prob", 0.1)), pre_norm=False,
        norm_eps=config.get("layer_norm_eps", 1e-12), causal=False, embedding_norm=True, type_vocab_size=types,
        lm_head_transform=head, lm_head_bias=head, init_std=config.get("initializer_range", 0.02))


def bert_hf_config(cfg: ModelConfig, common: dict) -> dict:
    """config.json of BertForMaskedLM for an `is_bert` model with the masked-LM head."""
    return {"model_type": "bert", **common, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ffn_dim, "hidden_act": HIDDEN_ACT[cfg.mlp],
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute", "is_decoder": False,
            "add_cross_attention": False, "classifier_dropout": None}


def is_not_loaded(name: str) -> bool:
    """An HF BERT tensor an import leaves out on purpose (see NOT_LOADED_PREFIXES)."""
    return name.startswith(NOT_LOADED_PREFIXES) or name in NOT_LOADED_NAMES
