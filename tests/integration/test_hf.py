"""`lmtrain export format=hf` on models lmtrain trained, and `init_from=hf:<dir>` in real runs: the
export loads in transformers with lmtrain's logits and greedy generations and its tokenizer's
specials; the built-in check fails loudly on a corrupted tensor; an HF model fine-tunes (classify)
and continues pretraining on data tokenized with its tokenizer, then exports back, checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmtrain_testing import TINY_TRAIN, example_overrides, refusal_line, train_in_process, write_classification_data  # noqa: E402

pytestmark = pytest.mark.slow

FAMILIES = {
    "gpt2": ["model.positional=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true"],
    "llama": ["model.n_kv_heads=1", "model.tied_embeddings=false"],  # tiny is rope + rmsnorm + swiglu
    # Trained with document masking: transformers' causal attention computes its logits on one document.
    "llama_document": ["model.n_kv_heads=1", "model.tied_embeddings=false", "model.attention=document"],
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, prepared, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    run = train_in_process([*prepared, *TINY_TRAIN, *FAMILIES[request.param], "trainer.max_steps=3",
                            "trainer.val_every_steps=100"], root / "runs" / request.param)
    return request.param, run / "checkpoints" / "last.ckpt"


def max_diff_line(output: str) -> float:
    return float(re.search(r"max abs difference (\S+)", output).group(1))


def test_export_loads_in_transformers_with_lmtrain_logits_generation_and_tokens(trained, cli, tmp_path):
    from lmtrain.inference import load_model

    family, ckpt = trained
    out = tmp_path / "export"
    proc = cli(["export", f"ckpt={ckpt}", "format=hf", f"out={out}", "max_shard_size=50KB"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff_line(proc.stdout) <= 1e-5, proc.stdout
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= {p.name for p in out.iterdir()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                 "llama_document": "LlamaForCausalLM"}[family]
    assert ("model.attention=document" in proc.stdout) == (family == "llama_document")
    ours, _ = load_model(ckpt, device="cpu")
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    ids[ids == 256] = 65  # one document (no eos inside)
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)[..., : ours.cfg.vocab_size]).abs().max().item()
    assert diff <= 1e-5, diff
    prompt = torch.tensor([list(b"The cat ")])
    theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ours.generate(prompt, 20, temperature=0).tolist() == theirs.tolist()

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    # bos is eos: what an lmtrain causal LM knows as a document start (lm-eval prefixes texts with it)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, tokenizer.mask_token) == (
        "<|endoftext|>", "<|pad|>", "<|endoftext|>", "<|mask|>")
    assert hf.config.bos_token_id == 256
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257)
    assert tokenizer("The cat")["input_ids"] == list(b"The cat")
    assert (hf.config.eos_token_id, hf.config.pad_token_id, hf.config.vocab_size) == (256, 257, 262)


def test_the_check_fails_loudly_on_a_corrupted_tensor(trained, cli, tmp_path, monkeypatch):
    import lmtrain.hf.export as hf_export

    _, ckpt = trained
    convert = hf_export.to_hf_state

    def corrupted(state, cfg):
        out = convert(state, cfg)
        name = sorted(k for k in out if "layers.1." in k or "h.1." in k)[0]
        out[name] = out[name] + 1e-3  # one tensor of the last block, slightly off
        return out

    monkeypatch.setattr(hf_export, "to_hf_state", corrupted)
    proc = cli(["export", f"ckpt={ckpt}", "format=hf", f"out={tmp_path / 'bad'}"])
    line = refusal_line(proc)
    assert "does not compute lmtrain's logits" in line and "check_atol=0.0001" in line
    assert max_diff_line(proc.stdout) > 1e-4
    unchecked = cli(["export", f"ckpt={ckpt}", "format=hf", f"out={tmp_path / 'unchecked'}", "check=false"])
    assert unchecked.returncode == 0 and "max abs difference" not in unchecked.stdout


def test_export_refuses_what_it_must_not_write_over(trained, cli, tmp_path):
    _, ckpt = trained
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    line = refusal_line(cli(["export", f"ckpt={ckpt}", "format=hf", f"out={mine}", "overwrite=true"]))
    assert "not a Hugging Face export" in line and (mine / "todo.txt").read_text() == "keep me"
    line = refusal_line(cli(["export", f"ckpt={ckpt}", "format=hf", f"out={ckpt.parent / 'hf'}"]))
    assert "never written over" in line
    out = tmp_path / "twice"
    assert cli(["export", f"ckpt={ckpt}", "format=hf", f"out={out}", "check=false"]).returncode == 0
    assert "already exists" in refusal_line(cli(["export", f"ckpt={ckpt}", "format=hf", f"out={out}"]))
    assert cli(["export", f"ckpt={ckpt}", "format=hf", f"out={out}", "overwrite=true", "check=false"]).returncode == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".twice")]  # no temp or old directory left


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    """A tiny random GPT2LMHeadModel saved as on the hub, with the byte tokenizer as its tokenizer.json."""
    from lmtrain.data.tokenizers import ByteTokenizer

    directory = tmp_path_factory.mktemp("hf-gpt2") / "tiny-gpt2"
    config = transformers.GPT2Config(vocab_size=262, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


def test_init_from_hf_fine_tunes_a_classifier(hf_gpt2, tmp_path, capsys):
    train, val = write_classification_data(tmp_path / "data", n_train=64, n_val=16)
    run = train_in_process([*example_overrides(train, val), *TINY_TRAIN, "task=classify", "data.text_column=sentence",
                            f"init_from=hf:{hf_gpt2}", "trainer.max_steps=2", "trainer.val_every_steps=100"],
                           tmp_path / "runs" / "cls")
    said = capsys.readouterr().out
    assert "model derived from" in said and "d_model=32 n_layers=2" in said and "initialised 29 tensors" in said
    assert "padding uses eos" not in said  # the byte tokenizer has <|pad|>
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_init_from_hf_continues_pretraining_then_exports_back(hf_gpt2, tmp_path, cli, capsys):
    from lmtrain_testing import data_overrides, write_corpus

    corpus = write_corpus(tmp_path / "text")
    same_tokenizer = [*data_overrides(corpus, tmp_path / "cache"), "tokenizer=pretrained", f"tokenizer.path={hf_gpt2}"]
    assert cli(["prepare", *same_tokenizer]).returncode == 0
    run = train_in_process([*same_tokenizer, *TINY_TRAIN, f"init_from=hf:{hf_gpt2}", "trainer.max_steps=2",
                            "trainer.val_every_steps=100"], tmp_path / "runs" / "cont")
    assert "model derived from" in capsys.readouterr().out
    proc = cli(["export", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "format=hf", f"out={tmp_path / 'back'}"])
    assert proc.returncode == 0 and max_diff_line(proc.stdout) <= 1e-5, proc.stderr[-2000:]
    config = transformers.AutoConfig.from_pretrained(tmp_path / "back")
    assert (config.model_type, config.n_embd, config.n_layer, config.vocab_size) == ("gpt2", 32, 2, 262)


def test_init_from_hf_refuses_data_of_another_tokenizer(hf_gpt2, prepared, tmp_path, monkeypatch):
    import json

    from lmtrain.hf.backbone import load_hf_backbone

    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (other / name).write_bytes((hf_gpt2 / name).read_bytes())
    tokenizer = json.loads((hf_gpt2 / "tokenizer.json").read_text())
    tokenizer["added_tokens"][-1]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    load_hf_backbone.cache_clear()
    with pytest.raises(ValueError, match=r"prepared with another tokenizer .* tokenizer=pretrained tokenizer.path="):
        train_in_process([*prepared, *TINY_TRAIN, f"init_from=hf:{other}", "trainer.max_steps=1"], tmp_path / "runs" / "x")


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory) -> Path:
    """A tiny random BertForMaskedLM saved as on the hub, with a WordPiece tokenizer.json of BERT's layout."""
    from lmtrain_testing import write_bert_tokenizer

    from lmtrain.data.tokenizers import load_tokenizer

    directory = tmp_path_factory.mktemp("hf-bert") / "tiny-bert"
    vocab = load_tokenizer(write_bert_tokenizer(directory)).vocab_size
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(directory)
    return directory


def test_init_from_hf_bert_fine_tunes_a_classifier(hf_bert, tmp_path, capsys):
    """BERT's tokenizer is the run's: the classifier reads [CLS] text, padded with [PAD], through the
    imported encoder (its masked-LM head loaded, frozen, unused)."""
    train, val = write_classification_data(tmp_path / "data", n_train=64, n_val=16)
    run = train_in_process([*example_overrides(train, val), *TINY_TRAIN, "task=classify", "data.text_column=sentence",
                            f"init_from=hf:{hf_bert}", "trainer.max_steps=3", "trainer.val_every_steps=100"],
                           tmp_path / "runs" / "bert-cls")
    said = capsys.readouterr().out
    assert "(bert)" in said and "mlp=gelu_exact type_vocab_size=2 masked-LM head=True" in said
    # lmtrain's 34 tensors of BertForMaskedLM's 42 (query, key, value fused into qkv), plus the tied lm_head
    assert "initialised 35 tensors" in said and "padding uses eos" not in said
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_init_from_hf_bert_continues_masked_lm_then_exports_back(hf_bert, tmp_path, cli, capsys):
    from lmtrain_testing import data_overrides, write_corpus

    corpus = write_corpus(tmp_path / "text")
    same_tokenizer = [*data_overrides(corpus, tmp_path / "cache"), "tokenizer=pretrained", f"tokenizer.path={hf_bert}"]
    assert cli(["prepare", *same_tokenizer]).returncode == 0
    run = train_in_process([*same_tokenizer, *TINY_TRAIN, "task=masked_lm", f"init_from=hf:{hf_bert}",
                            "trainer.max_steps=2", "trainer.val_every_steps=100"], tmp_path / "runs" / "mlm")
    assert "model derived from" in capsys.readouterr().out
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = cli(["export", f"ckpt={ckpt}", "format=hf", f"out={tmp_path / 'back'}"])
    assert proc.returncode == 0 and max_diff_line(proc.stdout) <= 1e-5, proc.stderr[-2000:]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "back").eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    text = f"the cat sees {tokenizer.mask_token} red ball ."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    from lmtrain.inference import load_model

    ours, _ = load_model(ckpt, device="cpu")
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)[..., : ours.cfg.vocab_size]).abs().max().item()
    assert diff <= 1e-5, diff
