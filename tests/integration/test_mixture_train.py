"""Training on a weighted mixture of prepared datasets: per-source validation, a clear refusal of
sources with different tokenizers, global_batch_tokens, and bitwise-exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmtrain.checkpoint import resolve_checkpoint
from lmtrain_testing import (TINY_TRAIN, compose, data_overrides, losses_by_step, refusal_line, run_cli,
                             train_in_process, write_corpus, write_mood_corpus)

pytestmark = pytest.mark.slow


def prepare(overrides: list[str]) -> Path:
    from lmtrain.config import to_typed
    from lmtrain.data.prepare import prepare_dataset

    typed = to_typed(compose("prepare", overrides))
    return prepare_dataset(typed.data, typed.tokenizer, log=lambda _: None)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture")
    web = prepare(data_overrides(write_corpus(root / "web"), root / "cache") + ["data.name=web"])
    moods = prepare(data_overrides(write_mood_corpus(root / "moods", n_paragraphs=120), root / "cache") + ["data.name=moods"])
    bpe = prepare([*data_overrides(write_corpus(root / "web"), root / "cache"), "data.name=web_bpe", "tokenizer=bpe",
                   "tokenizer.vocab_size=300", "tokenizer.min_frequency=1"])
    return {"web": web, "moods": moods, "bpe": bpe}


def mixture(sources, weights=(0.75, 0.25)) -> list[str]:
    items = ", ".join(f"{{name: {name}, prepared: '{sources[name]}', weight: {w}}}" for name, w in zip(("web", "moods"), weights))
    return ["data=mixture", f"data.sources=[{items}]", "tokenizer=byte"]


ARGS = [*TINY_TRAIN, "trainer.max_steps=12", "trainer.val_every_steps=6", "trainer.ckpt_every_steps=6", "model.dropout=0.1"]


def test_validation_reports_each_source_and_the_weighted_mean(sources, tmp_path, capsys):
    run_dir = train_in_process([*mixture(sources), *ARGS], tmp_path / "run")
    from lmtrain.loggers import read_metrics

    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in row]
    assert [row["step"] for row in rows] == [6, 12]
    for row in rows:
        assert row["val/loss"] == pytest.approx(0.75 * row["val/web/loss"] + 0.25 * row["val/moods/loss"], rel=1e-9)
        assert row["val/web/loss"] != row["val/moods/loss"]
        assert row["val/ppl"] == pytest.approx(math.exp(row["val/loss"]))
    # lmtrain eval of the checkpoint: the same subset of each source (2 batches of 4 windows), the same numbers
    from lmtrain.config import EvalConfig
    from lmtrain.evaluate import run as evaluate

    result = evaluate(EvalConfig(ckpt=str(run_dir / "checkpoints" / "last.ckpt"), device="cpu", val_batches=2))
    for key in ("val/web/loss", "val/moods/loss", "val/loss"):
        assert result[key] == pytest.approx(rows[-1][key], rel=1e-5), key
    out = capsys.readouterr().out
    assert "mixture: web 75.0% (" in out and "moods 25.0% (" in out
    assert "mixture-weighted" in out
    ckpt = torch.load(resolve_checkpoint(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)
    state = next(v for k, v in ckpt.items() if k.endswith("LMDataModule"))
    assert [m["name"] for m in state["mixture"]] == ["web", "moods"] and state["consumed_samples"] == 48


def test_sigkill_then_resume_of_a_mixture_with_document_masking_is_bitwise_exact(sources, tmp_path):
    args = ["train", *mixture(sources), *ARGS, "trainer.ckpt_every_steps=5", "model.attention=document"]
    run_cli([*args, "run_name=ref"], cwd=tmp_path)
    killed = run_cli([*args, "run_name=job"], cwd=tmp_path, env={"LMTRAIN_FAULT": "kill_after_checkpoint:5"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_cli([*args, "run_name=job"], cwd=tmp_path)
    assert "resuming from" in resumed.stdout
    ref, job = losses_by_step(tmp_path / "runs" / "ref"), losses_by_step(tmp_path / "runs" / "job")
    assert sorted(job) == list(range(1, 13)) and [job[s] for s in job] == [ref[s] for s in job]
    from lmtrain.trained import load_trained

    trained = load_trained(tmp_path / "runs" / "job" / "checkpoints" / "last.ckpt", "cpu")
    assert trained.model.cfg.attention.name == "document" and trained.model.cfg.eos_id == trained.tokenizer.eos_id
    # A changed mixture is refused on resume, naming both.
    changed = run_cli(["train", *mixture(sources, weights=(0.5, 0.5)), *ARGS, "run_name=job", "trainer.max_steps=14"],
                      cwd=tmp_path, check=False)
    assert changed.returncode != 0
    assert "web (weight 0.75" in changed.stderr and "web (weight 0.5" in changed.stderr


def test_sources_with_different_tokenizers_are_refused_naming_both(sources, tmp_path, cli):
    items = f"[{{name: web, prepared: '{sources['web']}'}}, {{name: code, prepared: '{sources['bpe']}'}}]"
    proc = cli(["train", "data=mixture", f"data.sources={items}", *ARGS, f"runs_dir={tmp_path}"], tmp_path)
    line = refusal_line(proc)
    assert "data.sources[1] code" in line and str(sources["bpe"]) in line and str(sources["web"]) in line
    assert "bpe, sha256" in line and "byte, sha256" in line


@pytest.mark.parametrize("overrides,expected", [
    (["data=mixture"], "data=mixture but data.sources is empty"),
    (["data=mixture", "data.sources=[{name: a, prepared: /x, weight: -1}]"], "data.sources[0].weight=-1.0 must be a positive"),
    (["data=mixture", "data.sources=[{name: a, prepared: /x}, {name: a, prepared: /y}]"], "repeat a name"),
    (["trainer.global_batch_tokens=100", "trainer.seq_len=32"], "trainer.global_batch_tokens=100 is not a positive multiple of trainer.seq_len=32: a step reads whole sequences. Use 96 or 128"),
    (["trainer.global_batch_tokens=128", "trainer.global_batch_size=4"], "are both set"),
])
def test_bad_mixture_and_batch_settings_are_refused(prepared, tmp_path, cli, overrides, expected):
    proc = cli(["train", *prepared, *TINY_TRAIN, *overrides, f"runs_dir={tmp_path}"], tmp_path)
    assert expected in refusal_line(proc)


def test_max_epochs_refuses_a_run_that_repeats_a_source_too_often(sources, tmp_path, cli):
    items = (f"[{{name: web, prepared: '{sources['web']}', weight: 0.5}}, "
             f"{{name: moods, prepared: '{sources['moods']}', weight: 0.5, max_epochs: 0.5}}]")
    proc = cli(["train", "data=mixture", f"data.sources={items}", *ARGS, "trainer.max_steps=1000", f"runs_dir={tmp_path}"], tmp_path)
    line = refusal_line(proc)
    assert "data.sources moods: trainer.max_steps reads it" in line and "more than its max_epochs=0.5" in line


def test_global_batch_tokens_sets_the_batch_in_sequences(prepared, tmp_path):
    run_dir = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=2", "trainer.global_batch_tokens=256",
                                "trainer.val_every_steps=100"], tmp_path / "run")
    ckpt = torch.load(resolve_checkpoint(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)
    state = next(v for k, v in ckpt.items() if k.endswith("LMDataModule"))
    assert state["global_batch_size"] == 256 // 32 and state["consumed_samples"] == 2 * 8
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
