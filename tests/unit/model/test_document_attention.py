"""model.attention=document (issue 13): in a packed window each document reads only itself, so its
logits are those it gets alone; both kernels agree; causal attention is untouched; the KV cache and
the inspection path see the same documents as a whole-window forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmtrain.inspection import Capture
from lmtrain.model import Attention, KVCache, ModelConfig, build_model
from lmtrain.model.decoding import beam_search, greedy_decode
from lmtrain.model.documents import build_document_mask

PRESET_DIR = Path(__file__).resolve().parents[3] / "conf" / "model"
VOCAB, EOS = 97, 3
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
PRESETS = {"gpt2_124m": dict(TINY), "llama_160m": dict(TINY, n_kv_heads=2)}  # llama: rope + GQA
# A window of 48 tokens: documents of 5, 9, 1 (a lone eos), 12 and 7 tokens, then the start of one cut off.
DOC_LENGTHS = (5, 9, 1, 12, 7, 14)


def preset(name: str, **overrides) -> ModelConfig:
    raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    return ModelConfig(**{**raw, **PRESETS[name], **overrides})


def document_model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset(name, attention="document", eos_id=EOS, **overrides)).eval()


def same_weights(model: torch.nn.Module, **overrides) -> torch.nn.Module:
    """`model`'s weights under another config."""
    twin = build_model(ModelConfig(**{**vars(model.cfg), **overrides})).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def packed(lengths: tuple[int, ...], seed: int, last_complete: bool = False) -> list[list[int]]:
    """Documents of these lengths, each ending with EOS (the last only if last_complete), no EOS inside."""
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for i, length in enumerate(lengths):
        body = torch.randint(EOS + 1, VOCAB, (length - 1,), generator=generator).tolist()
        ends = i < len(lengths) - 1 or last_complete
        docs.append(body + [EOS if ends else int(torch.randint(EOS + 1, VOCAB, (1,), generator=generator))])
    return docs


def window(docs: list[list[int]]) -> torch.Tensor:
    return torch.tensor([sum(docs, [])])  # (1, T)


def assert_each_document_reads_alone(model: torch.nn.Module, rows: list[list[list[int]]], atol: float = 1e-5) -> None:
    with torch.no_grad():
        logits = model(torch.cat([window(docs) for docs in rows]))  # (B, T, V)
        for row, docs in enumerate(rows):
            start = 0
            for doc in docs:
                alone = model(torch.tensor([doc]))[0]
                here = logits[row, start : start + len(doc)]
                assert torch.allclose(here, alone, atol=atol), (row, start, (here - alone).abs().max())
                start += len(doc)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_packed_window_logits_equal_each_document_alone(name, kernel):
    model = document_model(name, document_kernel=kernel)
    # Two rows packed differently, so a mask mixed up between rows shows.
    assert_each_document_reads_alone(model, [packed(DOC_LENGTHS, seed=1), packed((20, 3, 25), seed=2)])


def test_the_mask_matters_causal_logits_differ_after_the_first_document():
    model = document_model("llama_160m")
    causal = same_weights(model, attention="causal")
    x = window(packed(DOC_LENGTHS, seed=1))
    with torch.no_grad():
        documents, plain = model(x), causal(x)
    first = DOC_LENGTHS[0]
    assert torch.allclose(documents[:, :first], plain[:, :first], atol=1e-5)
    assert not torch.allclose(documents[:, first:], plain[:, first:], atol=1e-3)


def test_rope_is_relative_so_documents_read_alone_without_restarting_positions():
    model = document_model("llama_160m", document_positions=False)
    assert_each_document_reads_alone(model, [packed(DOC_LENGTHS, seed=3)], atol=1e-4)


def test_learned_positions_must_restart_for_a_document_to_read_alone():
    model = document_model("gpt2_124m", document_positions=False)
    docs = packed(DOC_LENGTHS, seed=3)
    with torch.no_grad():
        second = model(window(docs))[0, len(docs[0]) : len(docs[0]) + len(docs[1])]
        alone = model(torch.tensor([docs[1]]))[0]
    assert not torch.allclose(second, alone, atol=1e-3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_causal_logits_are_bitwise_untouched_by_the_document_fields(name):
    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    assert model.cfg.attention is Attention.causal  # the default
    twin = same_weights(model, eos_id=EOS, document_positions=False, document_kernel="flex")
    x = window(packed(DOC_LENGTHS, seed=4))
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flex_and_sdpa_kernels_agree(name):
    flex = document_model(name, document_kernel="flex")
    sdpa = same_weights(flex, document_kernel="sdpa")
    x = torch.cat([window(packed(DOC_LENGTHS, seed=5)), window(packed((30, 18), seed=6))])
    with torch.no_grad():  # flex has no backward on CPU; the gradients are compared on a GPU below
        assert torch.allclose(flex(x), sdpa(x), atol=1e-5)


def test_flex_refuses_a_backward_on_cpu_with_what_to_do():
    model = document_model("gpt2_124m", document_kernel="flex")
    with pytest.raises(ValueError, match="no backward on CPU.*document_kernel=auto"):
        model(window(packed(DOC_LENGTHS, seed=5)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_compiled_flex_and_sdpa_agree_on_cuda_logits_and_gradients(name):
    flex = document_model(name, document_kernel="flex").cuda().train()
    sdpa = same_weights(flex, document_kernel="sdpa").cuda().train()
    x = torch.cat([window(packed(DOC_LENGTHS, seed=5)), window(packed((30, 18), seed=6))]).cuda()
    grads = []
    for model in (flex, sdpa):
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append({key: p.grad for key, p in model.named_parameters()})
    with torch.no_grad():
        assert torch.allclose(flex(x), sdpa(x), atol=1e-4)
    for key, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][key], atol=1e-5), key


def test_a_window_ending_with_eos_closes_its_last_document():
    docs = packed((10, 17, 21), seed=7, last_complete=True)
    assert sum(docs, [])[-1] == EOS
    assert_each_document_reads_alone(document_model("gpt2_124m"), [docs])
    documents, positions = build_document_mask(window(docs), EOS)
    assert documents.query_ids[0].tolist() == [0] * 10 + [1] * 17 + [2] * 21
    assert positions[0].tolist() == list(range(10)) + list(range(17)) + list(range(21))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_window_without_eos_is_one_causal_document(name):
    model = document_model(name)
    causal = same_weights(model, attention="causal")
    x = window(packed((40,), seed=8))
    assert EOS not in x
    with torch.no_grad():
        assert torch.allclose(model(x), causal(x), atol=1e-5)


def test_document_ids_and_positions_match_their_definition():
    x = torch.tensor([[EOS, 5, EOS, EOS, 7, 8, 9, EOS, 4], [6, 6, 6, 6, 6, 6, 6, 6, EOS]])
    documents, positions = build_document_mask(x, EOS)
    for row in range(2):
        tokens = x[row].tolist()
        ids = [sum(t == EOS for t in tokens[:i]) for i in range(len(tokens))]  # eos strictly before i
        starts = [ids.index(d) for d in ids]
        assert documents.query_ids[row].tolist() == ids
        assert positions[row].tolist() == [i - s for i, s in enumerate(starts)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_gradients_flow_within_documents_and_never_across(device):
    model = document_model("llama_160m").to(device).train()  # auto: sdpa on CPU, flex on CUDA
    docs = packed(DOC_LENGTHS, seed=9)
    embedded = []

    def keep(module, args, out):
        out.retain_grad()
        embedded.append(out)

    model.tok_embeddings.register_forward_hook(keep)
    first, second = len(docs[0]), len(docs[0]) + len(docs[1])
    model(window(docs).to(device))[:, first:second].sum().backward()  # the second document's logits only
    grad = embedded[0].grad[0].abs().sum(-1)  # (T,)
    assert (grad[first:second] > 0).all()
    assert torch.count_nonzero(grad[:first]) == 0 and torch.count_nonzero(grad[second:]) == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_kv_cache_decoding_sees_the_documents_of_a_whole_window_forward(name):
    model = document_model(name)
    x = window(packed((6, 4, 9), seed=10))  # eos at 5 and 9: the cached chunks below cross both
    with torch.no_grad():
        whole = model(x)
        cache = KVCache(model.cfg.n_layers, max_len=x.shape[1])
        chunks = [model(x[:, :3], start_pos=0, kv_cache=cache)]
        chunks += [model(x[:, i : i + 1], start_pos=i, kv_cache=cache) for i in range(3, 8)]
        chunks.append(model(x[:, 8:], start_pos=8, kv_cache=cache))
    assert torch.allclose(torch.cat(chunks, dim=1), whole, atol=1e-5)


def test_generation_after_an_eos_in_the_prompt_reads_only_the_new_document():
    model = document_model("llama_160m")
    docs = packed((7, 5), seed=11)
    prompt = window([docs[0], docs[1][:-1]])  # a finished document, then the start of another
    continued = model.generate(prompt, 6, temperature=0)
    alone = model.generate(torch.tensor([docs[1][:-1]]), 6, temperature=0)
    assert continued[0, len(docs[0]):].tolist() == alone[0].tolist()
    assert greedy_decode(model, prompt[0].tolist(), 6, eos_id=EOS) == continued[0, prompt.shape[1]:].tolist()
    beams = beam_search(model, prompt[0].tolist(), 6, EOS, beam_size=3)
    assert beams == beam_search(model, docs[1][:-1], 6, EOS, beam_size=3)


def test_inspection_reports_the_document_mask_that_was_applied():
    model = document_model("llama_160m")
    with torch.no_grad():
        for block in model.blocks:  # peaked attention, so a wrong mask shows in the rebuilt output
            block.attn.qkv.weight.mul_(25.0)
    x = window(packed(DOC_LENGTHS, seed=12))
    documents, _ = build_document_mask(x, EOS)
    allowed = documents.allowed()  # (1, 1, T, T)
    with torch.no_grad(), Capture(model) as capture:
        model(x)
        maps = capture.attention()
    for layer, weights in enumerate(maps):
        assert torch.count_nonzero(weights.masked_fill(allowed, 0.0)) == 0
        attn = capture.blocks[layer].attn
        v = capture.values(layer).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        rebuilt = attn.out_proj((weights @ v).transpose(1, 2).reshape(1, x.shape[1], -1))
        assert torch.allclose(rebuilt, capture.attn_out[layer], atol=1e-5), layer


def test_forward_without_eos_id_names_the_setting():
    torch.manual_seed(0)
    model = build_model(preset("gpt2_124m", attention="document"))
    with pytest.raises(ValueError, match=r"model\.attention=document needs model\.eos_id"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_start_pos_without_a_cache_is_refused():
    with pytest.raises(ValueError, match="needs the kv_cache"):
        document_model("gpt2_124m")(torch.zeros(1, 4, dtype=torch.long), start_pos=4)


@pytest.mark.parametrize(
    ("overrides", "expected_in_message"),
    [
        ({"attention": "document", "causal": False}, ["model.attention=document", "model.causal=false"]),
        ({"attention": "sliding"}, ["model.attention='sliding'", "causal, document"]),
        ({"document_kernel": "flex", "dropout": 0.1}, ["model.document_kernel=flex", "model.dropout=0.1"]),
        ({"eos_id": 97, "vocab_size": 97}, ["model.eos_id=97", "model.vocab_size=97"]),
        ({"eos_id": -1}, ["model.eos_id=-1"]),
    ],
)
def test_invalid_document_settings_name_field_and_value(overrides, expected_in_message):
    with pytest.raises(ValueError) as error:
        ModelConfig(**overrides)
    for fragment in expected_in_message:
        assert fragment in str(error.value)


def test_with_eos_returns_a_validated_copy():
    cfg = ModelConfig(vocab_size=VOCAB, attention="document")
    assert cfg.with_eos(EOS).eos_id == EOS and cfg.eos_id is None
    with pytest.raises(ValueError, match="model.eos_id=200"):
        cfg.with_eos(200)


def test_attention_merges_into_the_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    merged = omegaconf.OmegaConf.merge(omegaconf.OmegaConf.structured(ModelConfig),
                                       {"attention": "document", "document_kernel": "sdpa"})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert cfg.attention is Attention.document and cfg.document_kernel.name == "sdpa"
