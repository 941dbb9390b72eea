"""Meta-device init under FSDP2 on 2 real gloo ranks: the model is built on `meta`, sharded, and
each rank initialises only its shards, yet the gathered weights equal a single-process eager build
bit for bit (GPT with tied embeddings, Llama with GQA); and `lmtrain train` runs under FSDP2 and
ZeRO-3 start from those weights (their first loss equals the single-process run's)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmtrain.distributed.config import StrategyKind
from lmtrain.distributed.parallelize import ParallelPlan, build_transformer, parallelize
from lmtrain.model import ModelConfig, build_model
from lmtrain_testing import CHILD_ENV, REPO, TINY_TRAIN, losses_by_step, run_cli

pytestmark = [pytest.mark.distributed]

SEED = 1234
MODELS = {
    "gpt_tied": dict(vocab_size=101, d_model=32, n_layers=3, n_heads=4, d_ff=80, max_seq_len=16, bias=True,
                     positional="learned", norm="layernorm", mlp="gelu", tied_embeddings=True),
    "llama_gqa": dict(vocab_size=99, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=72, max_seq_len=16,
                      positional="rope", norm="rmsnorm", mlp="swiglu", tied_embeddings=False, bias=False),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_on_rank(rank: int, world: int, port: int, fields: dict, meta: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plan = ParallelPlan(kind=StrategyKind.fsdp, precision="32-true", meta_init=meta)
        model = build_transformer(ModelConfig(**fields), plan, seed=SEED)
        if meta:
            assert all(p.is_meta for p in model.parameters())
        model = parallelize(model, plan, world_size=world, device=torch.device("cpu"), init_seed=SEED)
        local = {name: p.to_local().clone() for name, p in model.named_parameters()}
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        torch.save({"local": local, "full": full}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def sharded_build(tmp_path, fields: dict, meta: bool) -> list[dict]:
    out = str(tmp_path / f"weights-{'meta' if meta else 'eager'}")
    mp.start_processes(build_on_rank, args=(2, free_port(), fields, meta, out), nprocs=2, start_method="spawn")
    return [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in range(2)]


@pytest.mark.parametrize("name", list(MODELS))
def test_meta_init_under_fsdp_equals_eager_init_bitwise(tmp_path, name):
    fields = MODELS[name]
    eager = dict(build_model(ModelConfig(**fields), seed=SEED).named_parameters())
    meta, sharded_eager = sharded_build(tmp_path, fields, meta=True), sharded_build(tmp_path, fields, meta=False)
    assert list(meta[0]["full"]) == list(eager)
    for param, reference in eager.items():
        assert torch.equal(meta[0]["full"][param], reference), param
        assert torch.equal(sharded_eager[0]["full"][param], reference), param
        # each rank initialised only its own rows: the two shards are disjoint halves of the whole
        halves = [meta[rank]["local"][param] for rank in range(2)]
        assert sum(h.shape[0] for h in halves) == reference.shape[0], param
        assert torch.equal(torch.cat(halves), reference), param


@pytest.mark.slow
def test_sharded_runs_start_from_the_single_process_weights(prepared, tmp_path):
    """FSDP2 and ZeRO-3 with meta init (the default) on 2 ranks: the first loss, on the same batch,
    equals the single-process run's, so each started from the same weights."""
    common = ["trainer.max_steps=2", "trainer.val_every_steps=100", "trainer.accelerator=cpu", "trainer.global_batch_size=4",
              "model.dropout=0.0", "trainer.checkpoint=false", "trainer.log_every_steps=1"]
    run_cli(["train", *prepared, *TINY_TRAIN, *common, "trainer.devices=1", "trainer.micro_batch_size=4", "run_name=one"],
            cwd=tmp_path)
    one = losses_by_step(tmp_path / "runs" / "one")
    for strategy in ("fsdp", "deepspeed_zero3"):
        out = run_cli(["train", *prepared, *TINY_TRAIN, *common, "trainer.devices=2", "trainer.micro_batch_size=2",
                       f"strategy={strategy}", f"run_name={strategy}"], cwd=tmp_path).stdout
        assert f"strategy {strategy}" in out
        sharded = losses_by_step(tmp_path / "runs" / strategy)
        assert sharded[1] == pytest.approx(one[1], rel=1e-6), strategy  # the same initial weights, the same batch
        assert sharded[2] == pytest.approx(one[2], rel=1e-5), strategy


def test_init_memory_benchmark_smoke():
    """benchmarks/init_memory.py runs (tiny model) and prints its ratio line with equal weights."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "init_memory.py"), "--model", "tiny"],
                          capture_output=True, text=True, env={**os.environ, **CHILD_ENV}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("meta/eager peak host memory per rank"))
    ratio = float(line.split(":")[1].split(";")[0])
    assert 0 < ratio < 10 and line.endswith("weights equal: yes"), line
