"""lmtrain <-> Hugging Face conversion on tiny random HF models built here (no downloads): imported
logits and greedy generations equal transformers', HF -> lmtrain -> HF is bitwise, every weight
layout loads, and bad inputs fail with one line naming the file or tensor."""

from __future__ import annotations

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
    bert = copy("bert")
    edit_config(bert, model_type="bert", architectures=["BertForMaskedLM"])
    assert "model_type='bert'" in one_line_error(bert) and "gpt2" in one_line_error(bert)
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
    with pytest.raises(ValueError, match=r"seed_transformer .*positional=sinusoidal.*GPT2LMHeadModel.*LlamaForCausalLM"):
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
