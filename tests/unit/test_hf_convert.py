"""lmtrain <-> Hugging Face conversion on tiny random HF models built here (no downloads): imported
logits and greedy generations equal transformers', HF -> lmtrain -> HF is bitwise, every weight
layout loads, and bad inputs fail with one line naming the file or tensor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmtrain.data.tokenizers import ByteTokenizer  # noqa: E402  (after the skip: transformers is an extra)
from lmtrain.hf.backbone import load_hf_backbone, load_hf_state  # noqa: E402
from lmtrain.hf.convert import family_of, model_config_from_hf, to_hf_state  # noqa: E402
from lmtrain.hf.export import write_hf_dir  # noqa: E402
from lmtrain.hf.files import load_hf_weights, parse_size  # noqa: E402
from lmtrain.model.config import ModelConfig  # noqa: E402
from lmtrain.model.transformer import Transformer  # noqa: E402

VOCAB = 262  # the byte tokenizer's, saved beside each model as its tokenizer.json


def gpt2_config(**overrides):
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=256,
                                   eos_token_id=256, **overrides)


def llama_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rope_theta=5000.0,
                  rms_norm_eps=1e-5, bos_token_id=258, eos_token_id=256)
    return transformers.LlamaConfig(**{**values, **overrides})


CONFIGS = {"gpt2": gpt2_config, "llama-gqa-untied": llama_config,
           "llama-tied-bias": lambda: llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                                   num_key_value_heads=4)}


def save_hf_model(config, directory: Path, seed: int = 0, **save_args):
    """A random HF model (weights perturbed so norms and biases are not 1 and 0), with a tokenizer."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, **save_args)
    ByteTokenizer().save(directory)
    return model


def load_lmtrain(directory: Path) -> Transformer:
    load_hf_backbone.cache_clear()
    backbone = load_hf_backbone(str(directory))
    model = Transformer(backbone.model_cfg)
    model.load_state_dict(load_hf_state(backbone), strict=True)
    return model.eval()


@pytest.fixture(params=list(CONFIGS))
def hf_dir(request, tmp_path):
    model = save_hf_model(CONFIGS[request.param](), tmp_path / request.param)
    return tmp_path / request.param, model


def test_imported_logits_equal_transformers(hf_dir):
    directory, hf = hf_dir
    ours = load_lmtrain(directory)
    ids = torch.randint(0, VOCAB, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids)[..., :VOCAB] - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert ours.cfg.padded_vocab_size == VOCAB  # no padding rows: the loss is over HF's vocabulary exactly


def test_greedy_generation_is_token_for_token_equal(hf_dir):
    directory, hf = hf_dir
    ours = load_lmtrain(directory)
    prompt = torch.tensor([list(b"The cat sees ")])
    mine = ours.generate(prompt, 24, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=256)
    assert mine.tolist() == theirs.tolist()


def test_hf_to_lmtrain_to_hf_is_bitwise(hf_dir, tmp_path):
    directory, hf = hf_dir
    original = load_hf_weights(directory)
    ours = load_lmtrain(directory)
    state = {k: v for k, v in ours.state_dict().items() if not (ours.cfg.tied_embeddings and k == "lm_head.weight")}
    back = to_hf_state(state, ours.cfg)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    # ... and through the export's own writer, sharded, read back by transformers
    out = tmp_path / "out"
    out.mkdir()
    files = write_hf_dir(out, back, ours.cfg, ByteTokenizer(), dtype="fp32", max_shard_bytes=20_000)
    assert "model.safetensors.index.json" in files and len(files) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[k], hf.state_dict()[k]) for k in hf.state_dict())


def test_bin_sharded_and_prefixless_gpt2_weights_load(tmp_path):
    """The layouts found on the hub: pytorch_model.bin, sharded safetensors, and the original gpt2's
    names without the `transformer.` prefix (and its attn.bias mask buffers)."""
    hf = save_hf_model(gpt2_config(), tmp_path / "ref")
    reference = load_lmtrain(tmp_path / "ref").state_dict()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    bare.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
    for name, write in [("bin", lambda d: torch.save(bare, d / "pytorch_model.bin")),
                        ("sharded", lambda d: hf.save_pretrained(d, max_shard_size="20KB"))]:
        directory = tmp_path / name
        directory.mkdir()
        write(directory)
        (directory / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
        ByteTokenizer().save(directory)
        loaded = load_lmtrain(directory).state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference), name
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()


def one_line_error(directory: Path) -> str:
    load_hf_backbone.cache_clear()
    with pytest.raises(ValueError) as info:
        load_hf_state(load_hf_backbone(str(directory)))
    message = str(info.value)
    assert "\n" not in message
    return message


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_inputs_fail_with_one_line_naming_the_file_or_tensor(tmp_path):
    good = tmp_path / "good"
    save_hf_model(llama_config(), good)

    def copy(name: str) -> Path:
        import shutil

        return Path(shutil.copytree(good, tmp_path / name))

    assert "config.json does not exist" in one_line_error(tmp_path / "good" / "..")
    t5 = copy("t5")
    edit_config(t5, model_type="t5", architectures=["T5ForConditionalGeneration"])
    assert "model_type='t5'" in one_line_error(t5) and "bert (BertForMaskedLM" in one_line_error(t5)
    scaled = copy("scaled")
    edit_config(scaled, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    assert "rope_type='llama3'" in one_line_error(scaled)
    wider = copy("wider")
    edit_config(wider, intermediate_size=64)
    assert "model.layers.0.mlp.gate_proj.weight has shape (48, 32)" in one_line_error(wider)
    deeper = copy("deeper")
    edit_config(deeper, num_hidden_layers=3)
    assert "no tensor model.layers.2." in one_line_error(deeper)
    no_weights = copy("no-weights")
    (no_weights / "model.safetensors").unlink()
    assert "holds no weights" in one_line_error(no_weights)
    truncated = copy("truncated")
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    assert "model.safetensors cannot be read" in one_line_error(truncated)
    no_tokenizer = copy("no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    assert "tokenizer.json does not exist" in one_line_error(no_tokenizer)
    assert "no such directory" in one_line_error(tmp_path / "absent")


def test_models_no_hf_class_computes_are_refused_listing_what_maps():
    from lmtrain_testing import compose

    from lmtrain.config import to_typed

    seed = to_typed(compose("train", ["model=seed_transformer"])).model.with_vocab(VOCAB)
    with pytest.raises(ValueError, match=r"seed_transformer .*positional=sinusoidal.*GPT2LMHeadModel.*LlamaForCausalLM.*Bert"):
        family_of(seed)
    gpt2_with_gqa = ModelConfig(vocab_size=VOCAB, positional="learned", norm="layernorm", mlp="gelu", n_kv_heads=2)
    with pytest.raises(ValueError, match="n_kv_heads=2/n_heads=4"):
        family_of(gpt2_with_gqa)
    assert family_of(to_typed(compose("train", ["model=gpt2_124m"])).model).name == "gpt2"
    assert family_of(to_typed(compose("train", ["model=llama_160m"])).model).name == "llama"
    with pytest.raises(ValueError, match="activation_function='gelu'"):
        model_config_from_hf({"model_type": "gpt2", "activation_function": "gelu"}, source="x/config.json", name="x")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200KB") == 200_000 and parse_size("1234") == 1234
    with pytest.raises(ValueError, match="max_shard_size='lots'"):
        parse_size("lots")


# -- BERT ------------------------------------------------------------------------------------------


def bert_dir(tmp_path: Path, name: str, model_class: str = "BertForMaskedLM", seed: int = 0, **overrides):
    """A random BERT (weights perturbed, so norms and biases are not 1 and 0) saved with a WordPiece
    tokenizer.json, as a BERT directory on the hub."""
    from lmtrain_testing import write_bert_tokenizer

    from lmtrain.data.tokenizers import load_tokenizer

    directory = tmp_path / name
    vocab = load_tokenizer(write_bert_tokenizer(directory)).vocab_size
    values = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(transformers.BertConfig(**{**values, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    return directory, model


def bert_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (3, 40) and a key mask with the second row padded after 25 tokens."""
    ids = torch.randint(0, vocab, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 25:] = False
    return ids, mask


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_pytorch_tanh"])
def test_imported_bert_masked_lm_logits_equal_transformers(tmp_path, hidden_act):
    directory, hf = bert_dir(tmp_path, f"bert-{hidden_act}", hidden_act=hidden_act)
    ours = load_lmtrain(directory)
    assert ours.cfg.mlp.name == {"gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu"}[hidden_act]
    vocab = ours.cfg.vocab_size
    ids, mask = bert_inputs(vocab)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask.long()).logits
        diff = (mine - theirs)[mask].abs().max().item()  # padding positions are nobody's output
        types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(2))
        diff_types = (ours(ids, token_type_ids=types) - hf(ids, token_type_ids=types).logits).abs().max().item()
    assert diff <= 1e-5 and diff_types <= 1e-5, (diff, diff_types)
    assert ours.cfg.padded_vocab_size == vocab and not ours.cfg.causal


@pytest.mark.parametrize("model_class", ["BertModel", "BertForSequenceClassification"])
def test_bert_backbones_import_without_pooler_or_head(tmp_path, model_class):
    """A BertModel's or classifier's weights give the encoder (hidden states equal HF's), with a
    plain tied lm head; the pooler and classifier are left out on purpose."""
    directory, hf = bert_dir(tmp_path, model_class, model_class=model_class)
    ours = load_lmtrain(directory)
    assert not ours.cfg.lm_head_transform and not ours.cfg.lm_head_bias
    base = hf if model_class == "BertModel" else hf.bert
    ids, mask = bert_inputs(ours.cfg.vocab_size)
    with torch.no_grad():
        diff = (ours(ids, attention_mask=mask, hidden=True) - base(ids, attention_mask=mask.long()).last_hidden_state)
    assert diff[mask].abs().max().item() <= 1e-5


def test_bert_hf_to_lmtrain_to_hf_is_bitwise_and_the_export_loads(tmp_path):
    directory, hf = bert_dir(tmp_path, "bert")
    original = load_hf_weights(directory)
    ours = load_lmtrain(directory)
    state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}  # tied
    back = to_hf_state(state, ours.cfg)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    out = tmp_path / "out"
    out.mkdir()
    from lmtrain.data.tokenizers import load_tokenizer

    write_hf_dir(out, back, ours.cfg, load_tokenizer(directory), dtype="fp32", max_shard_bytes=10**9)
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(out)
    assert type(reloaded).__name__ == "BertForMaskedLM"
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in hf.state_dict().items())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token, tokenizer.mask_token, tokenizer.unk_token) == (
        "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")
    ids = tokenizer("the cat")["input_ids"]  # BERT's own template
    assert (ids[0], ids[-1], len(ids)) == (tokenizer.cls_token_id, tokenizer.sep_token_id, 4)
    assert (reloaded.config.pad_token_id, reloaded.config.bos_token_id) == (0, 2)
    assert not (out / "generation_config.json").exists()


def test_early_bert_layernorm_names_load(tmp_path):
    """BERT checkpoints from before transformers renamed them call LayerNorm weights gamma and beta
    and store position_ids and the decoder's tied copies; they load as the model they are."""
    directory, _ = bert_dir(tmp_path, "bert")
    reference = load_lmtrain(directory).state_dict()
    state = load_hf_weights(directory)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    old["bert.embeddings.position_ids"] = torch.arange(64)[None]
    old["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    (directory / "model.safetensors").unlink()
    torch.save(old, directory / "pytorch_model.bin")
    loaded = load_lmtrain(directory).state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_bert_bad_inputs_fail_with_one_line(tmp_path):
    import shutil

    good, _ = bert_dir(tmp_path, "good")

    def variant(name: str, **changes) -> Path:
        directory = Path(shutil.copytree(good, tmp_path / name))
        edit_config(directory, **changes)
        return directory

    assert "position_embedding_type='relative_key'" in one_line_error(
        variant("relative", position_embedding_type="relative_key"))
    assert "is_decoder=True" in one_line_error(variant("decoder", is_decoder=True))
    assert "hidden_act='silu'" in one_line_error(variant("silu", hidden_act="silu"))
    assert "tie_word_embeddings=False" in one_line_error(variant("untied", tie_word_embeddings=False))
    assert "bert.encoder.layer.0.intermediate.dense.weight has shape (48, 32)" in one_line_error(
        variant("wider", intermediate_size=64))
    assert "bert.embeddings.token_type_embeddings.weight has shape (2, 32)" in one_line_error(
        variant("types", type_vocab_size=3))
    # masked-LM weights under a config that says BertModel: the head's tensors are not the backbone's
    assert "hold tensor cls.predictions.bias (and 4 more)" in one_line_error(variant("arch", architectures=["BertModel"]))
    # ... and a BertModel's weights under a config that says BertForMaskedLM lack the head
    headless, _ = bert_dir(tmp_path, "headless", model_class="BertModel")
    edit_config(headless, architectures=["BertForMaskedLM"])
    assert "has no tensor cls.predictions.bias" in one_line_error(headless)


def test_bert_base_preset_is_bert_for_masked_lm_exactly():
    """bert_base maps onto BertForMaskedLM, whose parameter count (built from the exported config.json)
    is lmtrain's."""
    from lmtrain_testing import compose

    from lmtrain.config import to_typed
    from lmtrain.hf.convert import hf_config

    cfg = to_typed(compose("train", ["model=bert_base"])).model
    assert family_of(cfg).name == "bert"
    config = hf_config(cfg, bos_id=101, eos_id=102, pad_id=0, dtype="float32")
    with torch.device("meta"):
        hf = transformers.BertForMaskedLM(transformers.BertConfig(**config))
        ours = Transformer(cfg)
    assert sum(p.numel() for p in hf.parameters()) == ours.num_parameters() == 109_514_298
    assert (config["hidden_act"], config["layer_norm_eps"], config["type_vocab_size"]) == ("gelu", 1e-12, 2)
    headless = dataclasses.replace(cfg, lm_head_transform=False, lm_head_bias=False)
    with pytest.raises(ValueError, match="without its masked-LM head"):
        hf_config(headless, bos_id=101, eos_id=102, pad_id=0, dtype="float32")
