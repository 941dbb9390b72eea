"""The classic word-level Transformer LM end to end: prepare with tokenizer=word and explicit val
files, train seed_transformer, `lmtrain eval` reports the word-level perplexity, `lmtrain generate`
continues a prompt in words; and experiment=seed_wikitext2 against the shared WikiText-2 files."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from lmtrain_testing import OBJECTS, REPO, SHARED_DATA, SUBJECTS, VERBS, compose, train_in_process

WIKITEXT2 = SHARED_DATA / "wikitext-2"
needs_wikitext2 = pytest.mark.skipif(
    not ((WIKITEXT2 / "valid.txt").is_file() and (WIKITEXT2 / "test.txt").is_file()),
    reason=f"the shared WikiText-2 files are absent ({WIKITEXT2}/valid.txt, test.txt; see ../shared/data/README.md)",
)


def write_word_corpus(path: Path, n_lines: int, seed: int) -> Path:
    """WikiText-style lines: space-separated words and full stops, a blank line (one space) between
    paragraphs, as in wiki.*.tokens."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(rng.randint(2, 4))]
        lines += [" " + " ".join(sentences) + " ", " "]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def corpus_words() -> set[str]:
    return {word for phrase in (*SUBJECTS, *VERBS, *OBJECTS) for word in phrase.split()} | {"."}


@pytest.fixture(scope="module")
def word_data(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("words")
    train = write_word_corpus(root / "train.txt", n_lines=300, seed=0)
    val = write_word_corpus(root / "val.txt", n_lines=40, seed=1)
    return ["data=text_files", f"data.paths=[{train}]", f"data.val_paths=[{val}]", "data.text_unit=line",
            "data.keep_empty_documents=true", f"data.cache_dir={root / 'cache'}", "data.num_proc=1", "tokenizer=word"]


SMALL_SEED_TRANSFORMER = [
    "model=seed_transformer", "model.max_seq_len=64", "trainer.seq_len=16", "trainer.micro_batch_size=8",
    "trainer.val_batches=2", "trainer.val_every_steps=100", "trainer.log_every_steps=10", "trainer.progress_bar=false",
    "trainer.sample_tokens=8", "schedule.warmup_steps=5", "optim.lr=3e-3",
]


@pytest.mark.slow
def test_word_lm_trains_evaluates_word_perplexity_and_generates_words(word_data, tmp_path, cli):
    prepared = cli(["prepare", *word_data])
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    run_dir = train_in_process([*word_data, *SMALL_SEED_TRANSFORMER, "trainer.max_steps=40"], tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "last.ckpt"

    evaluated = cli(["eval", f"ckpt={ckpt}"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    loss = float(re.search(r"val loss (\d+\.\d+)", evaluated.stdout).group(1))
    word_ppl = float(re.search(r"val/word_ppl (\d+\.\d+) over ([\d,]+) words and eos", evaluated.stdout).group(1))
    assert word_ppl == pytest.approx(math.exp(loss), rel=1e-3, abs=0.006)  # ppl printed to 2 decimals (0.005), loss to 4 (x ppl: 0.0002)
    vocab = len(corpus_words()) + 7  # the words and the specials
    assert word_ppl < vocab / 3, evaluated.stdout  # well below uniform over the vocabulary: it learned the grammar
    assert "0.00% of them <unk>" in evaluated.stdout  # the val words are all train words

    generated = cli(["generate", f"ckpt={ckpt}", "prompt=the cat", "max_new_tokens=12", "temperature=0"])
    assert generated.returncode == 0, generated.stderr[-3000:]
    text = generated.stdout.rstrip("\n")
    assert text.startswith("the cat ")
    continuation = text.removeprefix("the cat ").split(" ")
    assert continuation and set(continuation) <= corpus_words(), text

    unknown = cli(["generate", f"ckpt={ckpt}", "prompt=the zebra", "max_new_tokens=5", "temperature=0"])
    assert unknown.returncode == 0, unknown.stderr[-3000:]
    words = unknown.stdout.rstrip("\n").split(" ")
    assert words[:2] == ["the", "zebra"] and len(words) > 2 and set(words[2:]) <= corpus_words()


def test_hub_preset_validates_on_the_validation_split():
    typed = compose_typed("prepare", ["data=wikitext2", "tokenizer=word"])
    assert (typed.data.hub_name, typed.data.hub_config) == ("Salesforce/wikitext", "wikitext-2-v1")
    assert typed.data.hub_split == "train" and typed.data.hub_val_split == "validation"
    assert typed.data.keep_empty_documents and typed.tokenizer.kind.name == "word"


@needs_wikitext2
def test_experiment_composes_against_the_local_files(monkeypatch):
    from lmtrain.data.prepare import prepared_dir
    from lmtrain.data.sources import resolve_local_files

    monkeypatch.chdir(REPO)  # the presets name ../shared/data relative to the checkout
    train = compose_typed("train", ["experiment=seed_wikitext2"])
    model = train.model
    assert (model.name, model.d_model, model.d_ff, model.n_layers, model.n_heads) == ("seed_transformer", 200, 200, 2, 2)
    assert model.dropout == 0.2 and not model.pre_norm and not model.tied_embeddings
    assert train.trainer.seq_len == 35 and train.tokenizer.kind.name == "word"
    assert resolve_local_files(train.data.paths) == [(WIKITEXT2 / "valid.txt").resolve()]
    assert resolve_local_files(train.data.val_paths) == [(WIKITEXT2 / "test.txt").resolve()]
    # The recipe's prepare command makes the very dataset the experiment trains on.
    prepare = compose_typed("prepare", ["data=wikitext2_local", "tokenizer=word"])
    assert prepared_dir(prepare.data, prepare.tokenizer) == prepared_dir(train.data, train.tokenizer)


@needs_wikitext2
@pytest.mark.slow
def test_local_wikitext2_packs_to_pytorch_examples_token_counts(monkeypatch, tmp_path):
    from lmtrain.data.prepare import load_prepared, prepare_dataset

    monkeypatch.chdir(REPO)
    typed = compose_typed("prepare", ["data=wikitext2_local", "tokenizer=word", f"data.cache_dir={tmp_path}"])
    meta = load_prepared(prepare_dataset(typed.data, typed.tokenizer, log=lambda _: None)).meta
    # One token per word and one <eos> per line, blank lines included (../shared/data/README.md).
    assert (meta.n_train_tokens, meta.n_val_tokens) == (217_646, 245_569)
    assert (meta.n_train_docs, meta.n_val_docs) == (3_760, 4_358)


def compose_typed(config_name: str, overrides: list[str]):
    from lmtrain.config import to_typed

    return to_typed(compose(config_name, overrides))
