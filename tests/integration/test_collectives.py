"""Communication per optimizer step, counted on 2 CPU ranks (LMTRAIN_COUNT_COLLECTIVES): FSDP2 with
gradient accumulation reduce-scatters once per step, after the last micro batch, not once per micro
batch; DDP broadcasts no buffers and blocks on no collective outside logging steps; and neither
changes a loss."""

from __future__ import annotations

import json

import pytest

from lmtrain_testing import TINY_TRAIN, losses_by_step, run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["trainer.max_steps=4", "trainer.val_every_steps=100", "trainer.accelerator=cpu", "trainer.devices=2",
          "trainer.global_batch_size=8", "model.dropout=0.0", "strategy=fsdp", "trainer.checkpoint=false",
          "trainer.log_every_steps=1"]
N_LAYERS = 2  # TINY_TRAIN: two blocks, each its own FSDP unit, plus the root


def counts(run_cwd, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_cwd / "counts" / f"collectives-rank{rank}.jsonl").read_text().splitlines()]


def test_fsdp_accumulation_reduce_scatters_once_per_step_with_unchanged_losses(prepared, tmp_path):
    env = {"LMTRAIN_COUNT_COLLECTIVES": str(tmp_path / "counts")}
    run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, "trainer.micro_batch_size=2", "run_name=accum"], cwd=tmp_path, env=env)
    accumulated = [counts(tmp_path, r) for r in range(2)]
    (tmp_path / "counts").rename(tmp_path / "counts-accum")
    run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, "trainer.micro_batch_size=4", "run_name=whole"], cwd=tmp_path, env=env)
    whole = [counts(tmp_path, r) for r in range(2)]
    for rank in range(2):
        assert [row["step"] for row in accumulated[rank]] == [1, 2, 3, 4]
        for a, w in zip(accumulated[rank], whole[rank]):
            # 2 micro batches per step, yet one reduce-scatter per FSDP unit, as without accumulation
            assert a.get("reduce_scatter_single") == w.get("reduce_scatter_single") == N_LAYERS + 1, (a, w)
    a, w = losses_by_step(tmp_path / "runs" / "accum"), losses_by_step(tmp_path / "runs" / "whole")
    assert sorted(a) == sorted(w) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(w[step], rel=1e-5), step


def test_ddp_keeps_each_ranks_loss_window_and_blocks_on_no_collective_between_log_steps(prepared, tmp_path):
    """Logging every 4 steps, the 2-rank train/loss is the mean over both ranks' micro batches, as
    one rank with the whole batch logs it: DDP does not overwrite rank 1's loss accumulators with rank 0's
    before every forward (it broadcasts no buffers at all)."""
    common = ["trainer.max_steps=8", "trainer.val_every_steps=100", "trainer.accelerator=cpu", "trainer.global_batch_size=4",
              "model.dropout=0.0", "trainer.checkpoint=false", "trainer.log_every_steps=4"]
    env = {"LMTRAIN_COUNT_COLLECTIVES": str(tmp_path / "counts")}
    run_cli(["train", *prepared, *TINY_TRAIN, *common, "trainer.devices=2", "trainer.micro_batch_size=2", "strategy=ddp",
             "run_name=two"], cwd=tmp_path, env=env)
    run_cli(["train", *prepared, *TINY_TRAIN, *common, "trainer.devices=1", "trainer.micro_batch_size=4", "run_name=one"],
            cwd=tmp_path)
    two, one = losses_by_step(tmp_path / "runs" / "two"), losses_by_step(tmp_path / "runs" / "one")
    assert sorted(two) == sorted(one) == [4, 8]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    for rank in range(2):
        rows = counts(tmp_path, rank)
        assert [row["step"] for row in rows] == list(range(1, 9))
        assert not any(row.get("_broadcast_coalesced") for row in rows), rows
        # Between logging steps a step blocks on no collective lmtrain or Lightning issues from Python
        # (DDP's gradient all-reduce runs in C++): no SIGTERM broadcast per micro batch, and the stop
        # flags are agreed by one all-reduce a step that nobody waits for until the next step.
        quiet = [row for row in rows if row["step"] % 4]
        assert quiet and all(row == {"step": row["step"], "all_reduce_async": 1} for row in quiet), quiet
