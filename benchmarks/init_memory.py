"""Peak host memory per rank while FSDP2 builds and shards a model: eager init against meta-device init.

Each mode starts its own ranks (gloo, CPU, one thread each) and runs what `lmtrain train
strategy=fsdp` runs to get its model (`build_transformer` then `parallelize`, with
strategy.meta_init=false or true):
- eager: every rank builds and initialises the whole fp32 model, then fully_shard keeps its shards;
- meta: every rank builds on the meta device, shards, then allocates and initialises its shards only
  (each parameter's full value is drawn one at a time and sliced).
Reported per rank: the peak resident set size above what the process held before the build
(VmHWM, reset just before), and the bytes of the rank's own shards; beside them `lmtrain plan`'s count of the
model's fp32 parameters, whole and per rank. At the end both modes' weights are compared (they
must be equal bit for bit).

    python benchmarks/init_memory.py                  # llama_1b (1.1B parameters), 2 ranks: ~9 GiB of RAM
    python benchmarks/init_memory.py --model tiny     # a quick look
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmtrain.distributed.config import StrategyKind  # noqa: E402
from lmtrain.distributed.parallelize import ParallelPlan, build_transformer, parallelize  # noqa: E402
from lmtrain.distributed.plan import count_parameters  # noqa: E402
from lmtrain.model import ModelConfig  # noqa: E402

MiB = 2**20
SEED = 20261130


def model_config(name: str) -> ModelConfig:
    fields = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    fields.pop("defaults", None)
    fields.setdefault("vocab_size", 50257)
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = 50257
    return ModelConfig(**fields)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def peak_rss_mib() -> float:
    """VmHWM: the peak resident set size since the process started or since reset_peak_rss()."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := the current RSS


def rank_main(rank: int, world: int, port: int, name: str, meta: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = model_config(name)
    plan = ParallelPlan(kind=StrategyKind.fsdp, precision="32-true", meta_init=meta)
    dist.barrier()
    reset_peak_rss()
    before = rss_mib()
    started = time.perf_counter()
    model = build_transformer(cfg, plan, seed=SEED)
    model = parallelize(model, plan, world_size=world, device=torch.device("cpu"), init_seed=SEED)
    seconds = time.perf_counter() - started
    shard_bytes = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    result = {"peak_mib": peak_rss_mib() - before, "held_mib": rss_mib() - before, "shard_mib": shard_bytes / MiB,
              "seconds": seconds}
    # A fingerprint of the whole model to compare the modes: each rank's shards, summed in float64.
    result["fingerprint"] = [float(p.to_local().detach().double().sum()) for p in model.parameters()]
    torch.save(result, f"{out}.rank{rank}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(name: str, meta: bool, world: int, directory: Path) -> list[dict]:
    out = str(directory / ("meta" if meta else "eager"))
    mp.start_processes(rank_main, args=(world, free_port(), name, meta, out), nprocs=world, start_method="spawn")
    return [torch.load(f"{out}.rank{rank}", weights_only=True) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_1b", help="a conf/model preset (default llama_1b)")
    parser.add_argument("--world", type=int, default=2, help="ranks (CPU processes)")
    args = parser.parse_args()
    cfg = model_config(args.model)
    counts = count_parameters(cfg)
    whole_mib = counts.stored * 4 / MiB
    print(f"model {args.model}: {counts.num_parameters:,} parameters ({counts.stored:,} stored); FSDP2 over {args.world} "
          f"CPU ranks; lmtrain plan: fp32 parameters {whole_mib:,.0f} MiB whole, {whole_mib / args.world:,.0f} MiB per rank",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run_mode(args.model, mode == "meta", args.world, Path(tmp)) for mode in ("eager", "meta")}
    print(f"{'init':<6} {'peak MiB/rank':>14} {'held MiB/rank':>14} {'own shards MiB':>15} {'seconds':>8}")
    for mode, ranks in results.items():
        worst = max(ranks, key=lambda r: r["peak_mib"])
        print(f"{mode:<6} {worst['peak_mib']:>14,.0f} {max(r['held_mib'] for r in ranks):>14,.0f} "
              f"{worst['shard_mib']:>15,.0f} {max(r['seconds'] for r in ranks):>8.1f}")
    eager_peak = max(r["peak_mib"] for r in results["eager"])
    meta_peak = max(r["peak_mib"] for r in results["meta"])
    same = all(a["fingerprint"] == b["fingerprint"] for a, b in zip(results["eager"], results["meta"]))
    print(f"meta/eager peak host memory per rank: {meta_peak / eager_peak:.3f}; weights equal: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
