"""DDP over gloo with real processes: the same optimization as one rank, exact resume after a
SIGKILL, resharding 2 ranks -> 1, two "nodes" on localhost, and no hang when a rank crashes or a
node freezes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmtrain_testing import CHILD_ENV, REPO, TINY_TRAIN, kill_tree, losses_by_step, run_cli, tree_signature, wait_for
from lmtrain.checkpoint import resolve_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["trainer.max_steps=12", "trainer.val_every_steps=6", "trainer.ckpt_every_steps=6", "trainer.accelerator=cpu",
          "trainer.global_batch_size=4", "model.dropout=0.0"]
ONE_RANK = ["trainer.devices=1", "trainer.micro_batch_size=4"]
TWO_RANKS = ["trainer.devices=2", "trainer.micro_batch_size=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(resolve_checkpoint(run_dir / "checkpoints" / name), weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory) -> dict[str, Path]:
    cwd = tmp_path_factory.mktemp("ddp")
    run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, *ONE_RANK, "run_name=one"], cwd=cwd)
    run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, *TWO_RANKS, "run_name=two"], cwd=cwd)
    run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, *ONE_RANK, "trainer.micro_batch_size=2", "run_name=accum"], cwd=cwd)
    return {"cwd": cwd, "one": cwd / "runs" / "one", "two": cwd / "runs" / "two", "accum": cwd / "runs" / "accum"}


def test_two_ranks_of_b_equal_one_rank_of_2b(runs):
    one, two = losses_by_step(runs["one"]), losses_by_step(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, 13))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert_same_weights(weights(runs["one"]), weights(runs["two"]), exact=False)
    # Only rank 0 writes: one run dir, one metrics file, no per-rank files or dirs.
    assert sorted(p.name for p in runs["cwd"].joinpath("runs").iterdir()) == ["accum", "one", "two"]
    assert sorted(p.name for p in runs["two"].iterdir()) == [".hydra", "checkpoints", "config.yaml", "metrics.jsonl", "owner.lock", "tokenizer"]


def test_val_loss_is_the_same_on_any_number_of_ranks_and_micro_batch(runs):
    """The validation subset is the first val_batches x global batch windows, whoever reads them."""
    from lmtrain.loggers import read_metrics

    def val(run_dir):
        return {row["step"]: row["val/loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in row}

    one, two, accum = val(runs["one"]), val(runs["two"]), val(runs["accum"])
    assert sorted(one) == sorted(two) == sorted(accum) == [6, 12]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5) and accum[step] == pytest.approx(one[step], rel=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(runs):
    """1 rank x micro 2 x 2 accumulation == 1 rank x micro 4 == 2 ranks x micro 2 (global batch 4)."""
    one, accum = losses_by_step(runs["one"]), losses_by_step(runs["accum"])
    assert sorted(accum) == list(range(1, 13))
    for step in one:
        assert accum[step] == pytest.approx(one[step], rel=1e-5), step
    assert_same_weights(weights(runs["one"]), weights(runs["accum"]), exact=False)


def test_sigkill_and_resume_with_accumulation_and_dropout_is_bitwise_exact(prepared, tmp_path):
    args = ["train", *prepared, *TINY_TRAIN, *COMMON, *ONE_RANK, "trainer.micro_batch_size=2", "model.dropout=0.2"]
    run_cli([*args, "run_name=ref"], cwd=tmp_path)
    killed = run_cli([*args, "run_name=job"], cwd=tmp_path, env={"LMTRAIN_FAULT": "kill_after_checkpoint:6"}, check=False)
    assert killed.returncode == -9
    run_cli([*args, "run_name=job"], cwd=tmp_path)
    ref, job = losses_by_step(tmp_path / "runs" / "ref"), losses_by_step(tmp_path / "runs" / "job")
    assert [job[s] for s in range(1, 13)] == [ref[s] for s in range(1, 13)]
    assert_same_weights(weights(tmp_path / "runs" / "ref"), weights(tmp_path / "runs" / "job"), exact=True)


def test_multinode_launcher_requires_a_shared_run_name(tmp_path):
    proc = subprocess.run([str(REPO / "launch" / "multinode.sh"), "--nodes", "2", "--node-rank", "0", "--master",
                           "127.0.0.1", "--", "true"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "--run-name" in proc.stderr
    bad = subprocess.run([str(REPO / "launch" / "multinode.sh"), "--nodes", "2", "--node-rank", "2", "--master",
                          "127.0.0.1", "--run-name", "x", "--", "true"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "--node-rank 2 must be in 0..1" in bad.stderr


def test_sigkill_and_resume_on_two_ranks_is_bitwise_exact(prepared, runs, tmp_path):
    args = ["train", *prepared, *TINY_TRAIN, *COMMON, *TWO_RANKS, "run_name=job"]
    killed = run_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": "kill_after_checkpoint:6"}, check=False)
    assert killed.returncode != 0
    run_dir = tmp_path / "runs" / "job"
    assert max(losses_by_step(run_dir)) == 6
    run_cli(args, cwd=tmp_path)
    assert [losses_by_step(run_dir)[s] for s in range(1, 13)] == [losses_by_step(runs["two"])[s] for s in range(1, 13)]
    assert_same_weights(weights(runs["two"]), weights(run_dir), exact=True)


@pytest.mark.parametrize("micro", [4, 1], ids=["same-accumulation", "accumulation-4"])
def test_two_rank_checkpoint_resumes_on_one_rank_at_the_same_sample(prepared, runs, tmp_path, micro):
    """2 ranks x micro 2 -> 1 rank x micro 4, or x micro 1 with 4 accumulation steps: the resumed steps
    take the same samples (Lightning's micro-batch count, 6 at step 6, is restated as 24 for the new
    accumulation; left at 6, the first step would take 2 micro batches and every later one would be shifted)."""
    ckpt = runs["two"] / "checkpoints" / "step-00000006.ckpt"
    assert ckpt.exists()
    run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, *ONE_RANK, f"trainer.micro_batch_size={micro}", f"resume={ckpt}",
             "run_name=resharded"], cwd=tmp_path)
    got, expected = losses_by_step(tmp_path / "runs" / "resharded"), losses_by_step(runs["one"])
    assert sorted(got) == list(range(7, 13))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_same_weights(weights(runs["one"]), weights(tmp_path / "runs" / "resharded"), exact=False)


def test_two_nodes_on_localhost(prepared, runs, tmp_path):
    logs, procs = start_two_nodes(tmp_path, "nodes", [*prepared, *TINY_TRAIN, *COMMON, "trainer.devices=1",
                                                       "trainer.micro_batch_size=2"], hold=False)
    outs = wait_for_both_nodes(logs, procs)
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    got, expected = losses_by_step(tmp_path / "runs" / "nodes"), losses_by_step(runs["two"])
    assert [got[s] for s in range(1, 13)] == pytest.approx([expected[s] for s in range(1, 13)], rel=1e-6)
    assert "2 ranks" in outs[0]


def test_a_crashed_rank_ends_the_job_nonzero_without_hanging(prepared, tmp_path):
    # The collective timeout is far longer than the test's patience: a surviving rank that waited
    # for it would go silent, and run_cli ends a process that makes no progress for STALL_S.
    stall_s = 300
    proc = run_cli(["train", *prepared, *TINY_TRAIN, *COMMON, *TWO_RANKS, "run_name=crash",
                    f"strategy.timeout_s={stall_s * 10}"], cwd=tmp_path, env={"LMTRAIN_FAULT": "crash:1:3"}, check=False,
                   stall_s=stall_s)
    assert proc.returncode != 0
    assert "injected crash of rank 1 at step 3" in proc.stdout + proc.stderr


def start_two_nodes(tmp_path: Path, run_name: str, args: list[str], *,
                    hold: bool = True) -> tuple[list[Path], list[subprocess.Popen]]:
    """Two "nodes" on localhost through launch/multinode.sh, one process each, each in a session of its
    own; hold: node 1 holds after step 3 (LMTRAIN_FAULT=hold:3) until the requeue signal or a SIGTERM."""
    port = str(free_port())
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    procs = [
        subprocess.Popen([str(REPO / "launch" / "multinode.sh"), "--nodes", "2", "--node-rank", str(rank), "--master",
                          "127.0.0.1", "--port", port, "--run-name", run_name, "--", sys.executable, "-m", "lmtrain", "train",
                          *args],
                         cwd=tmp_path, env={**os.environ, **CHILD_ENV, **({"LMTRAIN_FAULT": "hold:3"} if rank and hold else {})},
                         stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        for rank, log in enumerate(logs)
    ]
    return logs, procs


def wait_for_both_nodes(logs: list[Path], procs: list[subprocess.Popen]) -> list[str]:
    """Wait until both nodes exit (killing what is left if the wait fails); their logs."""
    try:
        wait_for(lambda: all(p.poll() is not None for p in procs), what="both nodes to exit",
                 progress=lambda: tree_signature(logs))
    finally:
        for p in procs:
            kill_tree(p)
    return [log.read_text() for log in logs]


def test_a_frozen_node_ends_the_job_within_the_peer_timeout(prepared, tmp_path):
    """Node 1 freezes (SIGSTOP: its sockets stay open, as with a lost node or a partition) while node 0
    waits for it in a collective whose own timeout is 50 min: node 0's watchdog ends it after
    strategy.peer_timeout_s of silence, naming the silent rank."""
    logs, procs = start_two_nodes(tmp_path, "frozen", [*prepared, *TINY_TRAIN, *COMMON, "trainer.devices=1",
                                                        "trainer.micro_batch_size=2", "strategy.timeout_s=3000",
                                                        "strategy.peer_timeout_s=10"])
    try:
        wait_for(lambda: "holding after step 3" in logs[1].read_text(), what="node 1 to hold after step 3",
                 progress=lambda: tree_signature(logs))
        os.killpg(procs[1].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        wait_for(lambda: procs[0].poll() is not None, what="node 0 to end", progress=lambda: tree_signature(logs))
        print(f"node 0 ended {time.monotonic() - frozen_at:.1f} s after node 1 froze")  # reported, not asserted
    finally:
        for p in procs:
            kill_tree(p)
    out = logs[0].read_text()
    assert procs[0].returncode != 0, out[-3000:]
    assert "rank 1 (" in out and "has not been heard from for" in out and "strategy.peer_timeout_s=10" in out, out[-3000:]


def test_a_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(prepared, tmp_path):
    """SIGTERM reaches rank 1 only (node 1 of two "nodes" on localhost, held after step 3 until it comes):
    both ranks agree on it at a step boundary, save that step and exit 143, and last.ckpt names it."""
    logs, procs = start_two_nodes(tmp_path, "stopped", [*prepared, *TINY_TRAIN, *COMMON, "trainer.devices=1",
                                                         "trainer.micro_batch_size=2", "trainer.ckpt_every_steps=100"])
    try:
        wait_for(lambda: "holding after step 3" in logs[1].read_text(), what="node 1 to hold after step 3",
                 progress=lambda: tree_signature(logs))
        held = re.search(r"holding after step 3 until .* \(pid (\d+)\)", logs[1].read_text())
        os.kill(int(held.group(1)), signal.SIGTERM)  # the training process of rank 1, not its launcher
    except BaseException:
        for p in procs:
            kill_tree(p)
        raise
    outs = wait_for_both_nodes(logs, procs)
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, outs[0][-3000:] + outs[1][-3000:]
    stop = re.search(r"SIGTERM received: saving at step (\d+), then stopping", outs[0])
    assert stop, outs[0][-3000:]
    step = int(stop.group(1))
    assert step in (3, 4)  # agreed within one step of the signal
    run_dir = tmp_path / "runs" / "stopped"
    assert f"stopped by SIGTERM at step {step} of 12; the newest checkpoint is step {step}" in outs[0]
    assert torch.load(resolve_checkpoint(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)["global_step"] == step
