"""DataConfig / TokenizerConfig validation and the conf/data, conf/tokenizer presets."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lmtrain.data.config import DataConfig, SourceKind, TextUnit, TokenizerConfig, TokenizerKind
from lmtrain.data.tokenizers import EXTRA_SPECIAL_TOKENS

CONF = Path(__file__).resolve().parents[3] / "conf"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"val_fraction": 0.0}, "data.val_fraction=0.0"),
        ({"val_fraction": 1.0}, "data.val_fraction=1.0"),
        ({"source": SourceKind.text}, "data.paths is empty but data.source=text"),
        ({"source": SourceKind.hub}, "data.hub_name=None"),
        ({"source": "nope"}, "data.source='nope' is not a valid choice; use one of: python_stdlib, text, json"),
        ({"text_unit": "word"}, "data.text_unit='word'"),
        ({"num_proc": 0}, "data.num_proc=0"),
        ({"max_documents": 1}, "data.max_documents=1"),
        ({"name": "a/b"}, "data.name='a/b'"),
        ({"text_column": ""}, "data.text_column is empty"),
    ],
)
def test_data_config_rejects_bad_values_by_name(kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        DataConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"vocab_size": 100}, "tokenizer.vocab_size=100"),
        ({"kind": TokenizerKind.pretrained}, "tokenizer.path is not set but tokenizer.kind=pretrained"),
        ({"kind": "gpt2"}, "tokenizer.kind='gpt2' is not a valid choice; use one of: byte, bpe, pretrained"),
        ({"min_frequency": 0}, "tokenizer.min_frequency=0"),
        ({"train_max_bytes": 0}, "tokenizer.train_max_bytes=0"),
        ({"eos_token": ""}, "tokenizer.eos_token is empty"),
    ],
)
def test_tokenizer_config_rejects_bad_values_by_name(kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        TokenizerConfig(**kwargs)


def test_enum_names_are_accepted_and_converted():
    data = DataConfig(source="text", paths=["x.txt"], text_unit="line")
    assert data.source is SourceKind.text and data.text_unit is TextUnit.line
    assert TokenizerConfig(kind="byte").kind is TokenizerKind.byte
    for enum_cls in (SourceKind, TextUnit, TokenizerKind):  # OmegaConf matches members by name
        assert all(member.name == member.value for member in enum_cls)


def test_min_bpe_vocab_matches_the_special_tokens():
    smallest = 256 + 1 + len(EXTRA_SPECIAL_TOKENS) + 1  # bytes, eos, extras, one merge
    TokenizerConfig(vocab_size=smallest)
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        TokenizerConfig(vocab_size=smallest - 1)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_presets_merge_into_the_schema(preset):
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "data" / f"{preset}.yaml"))
    if not node.paths and node.source in (SourceKind.text, SourceKind.json, SourceKind.parquet):
        node.paths = ["/some/file"]  # the user's part
    data = OmegaConf.to_object(node)
    assert isinstance(data, DataConfig) and data.name == preset


def test_data_preset_set_is_complete():
    names = {p.stem for p in (CONF / "data").glob("*.yaml")}
    assert names >= {"python_stdlib", "text_files", "jsonl_files", "parquet_files", "wikitext103", "fineweb_edu",
                     "tinyshakespeare"}
    assert OmegaConf.load(CONF / "data" / "tinyshakespeare.yaml").text_unit == "paragraph"


@pytest.mark.parametrize("preset", ["byte", "bpe", "pretrained"])
def test_tokenizer_presets_merge_into_the_schema(preset):
    node = OmegaConf.merge(OmegaConf.structured(TokenizerConfig), OmegaConf.load(CONF / "tokenizer" / f"{preset}.yaml"))
    assert node.kind == TokenizerKind[preset]
    if preset == "pretrained":
        with pytest.raises(Exception, match="tokenizer.path"):
            OmegaConf.to_object(node)
        node.path = "/some/tokenizer.json"
    assert isinstance(OmegaConf.to_object(node), TokenizerConfig)
