"""The fine-tuned tasks under the distributed strategies, on 2 CPU processes over gloo: the task
head is trained like the backbone (FSDP shards it, DDP and ZeRO reduce its gradients), validation
metrics gathered across ranks equal one process's, and the sharded checkpoints evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtrain_testing import (
    TINY_TRAIN,
    example_overrides,
    losses_by_step,
    run_cli,
    train_in_process,
    write_classification_data,
    write_qa_data,
    write_translation_data,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODEL = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=96", "model.dropout=0.0",
         "task.head_dropout=0.0"]
TWO = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.micro_batch_size=4", "trainer.global_batch_size=8"]
ONE = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.micro_batch_size=8"]


def val_rows(run_dir: Path) -> list[dict]:
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val/loss" in row]


def train(tmp_path: Path, name: str, args: list[str]) -> Path:
    """Several ranks: real processes. One process: in this one (the reference runs)."""
    if "trainer.devices=1" in args:
        return train_in_process(args, tmp_path / "runs" / name)
    run_cli(["train", *args, f"run_name={name}"], cwd=tmp_path)
    return tmp_path / "runs" / name


def test_classify_under_fsdp_matches_one_process(tmp_path):
    data = write_classification_data(tmp_path / "data", n_train=64, n_val=20)
    args = [*example_overrides(*data), *TINY_TRAIN, *MODEL, "task=classify", "model.causal=false", "data.text_column=sentence",
            "trainer.seq_len=48", "trainer.max_steps=6", "trainer.val_every_steps=6"]
    single = train(tmp_path, "one", [*args, *ONE])
    sharded = train(tmp_path, "fsdp", [*args, *TWO, "strategy=fsdp"])
    one, two = losses_by_step(single), losses_by_step(sharded)
    assert [two[s] for s in range(1, 7)] == pytest.approx([one[s] for s in range(1, 7)], rel=1e-4)
    assert val_rows(sharded)[-1]["val/accuracy"] == pytest.approx(val_rows(single)[-1]["val/accuracy"])
    # the sharded (DCP) checkpoint evaluates directly, head included
    from lmtrain.config import EvalConfig
    from lmtrain.evaluate import run as evaluate

    result = evaluate(EvalConfig(ckpt=str(sharded / "checkpoints" / "last.ckpt"), device="cpu"))
    assert result["val/examples"] == 20
    assert result["val/accuracy"] == pytest.approx(val_rows(sharded)[-1]["val/accuracy"])


def test_qa_under_ddp_gathers_every_example(tmp_path):
    data = write_qa_data(tmp_path / "data", n_train=64, n_val=21)  # 21 examples: one rank gets a filler
    args = [*example_overrides(*data), *TINY_TRAIN, *MODEL, "task=qa", "model.causal=false", "trainer.seq_len=64", "task.doc_stride=16",
            "trainer.max_steps=4", "trainer.val_every_steps=4"]
    ddp = train(tmp_path, "ddp", [*args, *TWO, "strategy=ddp"])
    last = val_rows(ddp)[-1]
    from lmtrain.config import EvalConfig
    from lmtrain.evaluate import run as evaluate

    result = evaluate(EvalConfig(ckpt=str(ddp / "checkpoints" / "last.ckpt"), device="cpu"))
    assert result["val/examples"] == 21
    assert last["val/exact_match"] == pytest.approx(result["val/exact_match"])
    assert last["val/f1"] == pytest.approx(result["val/f1"])


def test_translate_under_zero3_decodes_on_every_rank(tmp_path):
    pytest.importorskip("deepspeed")
    data = write_translation_data(tmp_path / "data", n_train=64, n_val=5)
    args = [*example_overrides(*data), *TINY_TRAIN, *MODEL, "task=translate", "trainer.seq_len=48",
            "trainer.max_steps=4", "trainer.val_every_steps=4", "task.bleu_examples=5", "task.max_target_tokens=6"]
    zero3 = train(tmp_path, "zero3", [*args, *TWO, "strategy=deepspeed_zero3"])
    # One process accumulating the same two micro batches: a translation loss is a mean over each
    # micro batch's target tokens, so the micro batches (not just the global batch) must match.
    single = train(tmp_path, "one", [*args, *ONE, "trainer.micro_batch_size=4", "trainer.global_batch_size=8"])
    a, b = val_rows(zero3)[-1], val_rows(single)[-1]
    assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4)
    assert a["val/bleu"] == pytest.approx(b["val/bleu"], abs=1e-6)  # same greedy decodes, gathered from 2 ranks
