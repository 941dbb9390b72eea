"""The GPU check: every strategy's save -> resume -> export with peak memory against `lmtrain plan`'s
estimate (first, eager: the budget always covers them), then bf16 throughput/MFU with and without
compile. Run through launch/gpu_check.sh on one GPU (<= 9 minutes: every process ends by
--deadline-s, inside the device's 600 s command cap).

Each configuration is a real `lmtrain train` process; figures come from its metrics.jsonl
(tokens/s and MFU of the last logging interval, after compile and warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
H200_PEAK = 989e12
MFU_TARGETS = {"gpt2_124m+compile": 0.40, "llama_1b+compile": 0.50}  # issue 14: the targets on one H200


@dataclass
class Job:
    name: str
    model: str
    strategy: str
    overrides: list[str] = field(default_factory=list)
    compile: bool = False


def matmul_tflops(device: str, n: int = 8192, iters: int = 30) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


DEADLINE: float | None = None  # time.perf_counter() by which every process must have ended (the device's command cap)


def lmtrain(args: list[str], cwd: Path, timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    if DEADLINE is not None:
        timeout = max(1.0, min(timeout, DEADLINE - t0))
    try:
        proc = subprocess.run([sys.executable, "-m", "lmtrain", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out, time.perf_counter() - t0


def last_row(run_dir: Path, key: str) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if key in r]
    return rows[-1] if rows else {}


def plan_gib(model: str, strategy: str, micro: int, seq: int, act_ckpt: bool = False) -> float | None:
    try:
        from lmtrain.config import register_configs
        from lmtrain.distributed.plan import estimate_memory
        from lmtrain.inference import model_config_from_record
        import yaml

        register_configs()
        cfg = model_config_from_record(yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text()))
        if cfg.vocab_size is None:
            cfg = cfg.with_vocab(32000)
        est = estimate_memory(cfg, strategy, micro_batch_size=micro, seq_len=seq, world_size=1,
                              precision="bf16-mixed", activation_checkpointing=act_ckpt)
        return est.total_bytes / 2**30
    except Exception as e:  # the check goes on without the estimate
        print(f"  (plan estimate unavailable: {type(e).__name__}: {e})")
        return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a prepared dataset dir (lmtrain prepare output)")
    ap.add_argument("--work", default="/tmp/gpu_check")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run with tiny models (to test this script)")
    ap.add_argument("--only", default="", help="comma-separated job names")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--budget-s", type=float, default=420, help="start no new job after this many seconds")
    ap.add_argument("--deadline-s", type=float, default=540,
                    help="every process ends by then (the device runs a command for at most 600 s)")
    args = ap.parse_args()
    global DEADLINE
    DEADLINE = time.perf_counter() + args.deadline_s
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    global LOG
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        LOG = Path(args.out) / "gpu_check.log"
    data = str(Path(args.data).resolve())

    import torch

    device = "cpu" if args.smoke else "cuda"
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    emit(f"device {name} | torch {torch.__version__} | python {sys.version.split()[0]}")
    tflops = None if args.smoke else matmul_tflops(device)
    if tflops:
        emit(f"measured bf16 matmul (8192^3): {tflops:.0f} TFLOP/s = {tflops * 1e12 / H200_PEAK:.0%} of 989")

    if args.smoke:
        base = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.seq_len=64", "trainer.micro_batch_size=2",
                "model.max_seq_len=64"]
        sizes = {"gpt2_124m": ["model=tiny"], "llama_1b": ["model=tiny"]}
        steps = (6, 3)
    else:
        base = ["trainer=gpu", "trainer.precision=bf16-mixed", "trainer.global_batch_size=null"]
        sizes = {"gpt2_124m": ["model=gpt2_124m", "trainer.seq_len=1024", "trainer.micro_batch_size=16"],
                 "llama_1b": ["model=llama_1b", "trainer.seq_len=2048", "trainer.micro_batch_size=8"]}
        steps = (40, 20)
    common = ["data=python_stdlib", f"data.prepared={data}", "trainer.val_every_steps=100000", "trainer.val_batches=2",
              "trainer.log_every_steps=10" if not args.smoke else "trainer.log_every_steps=2", "trainer.progress_bar=false",
              "schedule.warmup_steps=10", "trainer.sample_tokens=16", *base]

    perf_jobs = [Job(f"{m}{'+compile' if c else ''}", m, "single", compile=c)
                 for m in ("gpt2_124m", "llama_1b") for c in (False, True)]
    strategy_jobs = [Job(s, "gpt2_124m", s) for s in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp")]
    only = set(filter(None, args.only.split(",")))
    results = []

    started = time.perf_counter()

    def out_of_time(job: Job) -> bool:
        if time.perf_counter() - started < args.budget_s:
            return False
        emit(f"[{job.name}] SKIPPED: the {args.budget_s:.0f} s budget is spent")
        return True

    for job in strategy_jobs:
        if (only and job.name not in only) or out_of_time(job):
            continue
        run_name = f"strategy_{job.name}"
        micro = 8
        over = [*common, *sizes[job.model], f"trainer.micro_batch_size={micro}", f"strategy={job.strategy}",
                "trainer.compile=false", "trainer.devices=1", f"run_name={run_name}", f"runs_dir={work}",
                "trainer.ckpt_every_steps=10"]
        rc, out, secs = lmtrain(["train", *over, f"trainer.max_steps={steps[1]}"], work, timeout=150)
        resumed = ""
        if rc == 0:
            rc, out2, secs2 = lmtrain(["train", *over, f"trainer.max_steps={steps[1] + 10}"], work, timeout=150)
            out += out2
            secs += secs2
            resumed = "resumed" if "resuming from" in out2 else "NOT RESUMED"
        if rc == 0:
            ckpt = work / run_name / "checkpoints" / "last.ckpt"
            rc, out3, _ = lmtrain(["export", f"ckpt={ckpt}", "dtype=bf16", f"out={work / run_name / 'export.pt'}"], work, 150)
            out += out3
            resumed += " | exported" if rc == 0 and (work / run_name / "export.pt").is_file() else " | EXPORT FAILED"
        row = last_row(work / run_name, "perf/tokens_per_s") if rc == 0 else {}
        est = None if args.smoke else plan_gib(job.model, job.strategy, micro, 1024)
        results.append((job, rc, secs, row, est))
        report(job, rc, secs, row, est, out, extra=resumed)

    for job in perf_jobs:
        if (only and job.name not in only) or out_of_time(job):
            continue
        run_name = job.name.replace("+", "_")
        over = [*common, *sizes[job.model], f"strategy={job.strategy}", f"trainer.compile={str(job.compile).lower()}",
                f"trainer.max_steps={steps[0]}", "trainer.checkpoint=false", f"run_name={run_name}", f"runs_dir={work}"]
        rc, out, secs = lmtrain(["train", *over], work, timeout=150)
        row = last_row(work / run_name, "perf/tokens_per_s") if rc == 0 else {}
        results.append((job, rc, secs, row, None))
        report(job, rc, secs, row, None, out)

    if not only or "raw_loop" in only:
        raw_loop_ratio(args.smoke, started, args.budget_s)
    for line in summary(results, tflops):
        emit(line)
    return 0 if all(rc == 0 for _, rc, *_ in results) else 1


def raw_loop_ratio(smoke: bool, started: float, budget_s: float) -> None:
    """lmtrain's step against a plain PyTorch loop at gpt2_124m (benchmarks/throughput.py), reported
    as printed; a failure is reported, not fatal (the strategy and MFU jobs are the check)."""
    if time.perf_counter() - started >= budget_s:
        emit("[raw_loop] SKIPPED: the budget is spent")
        return
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--models", "gpt2_124m"]
    cmd += ["--smoke", "--device", "cpu"] if smoke else ["--device", "cuda", "--steps", "50", "--repeats", "3"]
    timeout = max(1.0, (DEADLINE or time.perf_counter() + 150) - time.perf_counter())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(timeout, 150), cwd=REPO)
        rows = [line for line in proc.stdout.splitlines() if line.startswith("gpt2_124m")]
        emit(f"[raw_loop] gpt2_124m lmtrain vs plain loop: {rows[-1] if rows else 'no row; rc=%d' % proc.returncode}")
        if not rows:
            emit("  " + "\n  ".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]))
    except subprocess.TimeoutExpired:
        emit("[raw_loop] timed out")


LOG: Path | None = None  # every line also goes here at once, so a run cut short still leaves its figures


def emit(line: str) -> None:
    print(line, flush=True)
    if LOG is not None:
        with open(LOG, "a") as f:
            f.write(line + "\n")


def report(job: Job, rc: int, secs: float, row: dict, est: float | None, out: str, extra: str = "") -> None:
    status = "ok" if rc == 0 else f"FAILED rc={rc}"
    mfu = f"mfu {row['perf/mfu']:.1%}" if "perf/mfu" in row else ""
    tok = f"{row['perf/tokens_per_s']:,.0f} tok/s" if "perf/tokens_per_s" in row else ""
    mem = f"peak {row['perf/peak_mem_gib']:.1f} GiB" if "perf/peak_mem_gib" in row else ""
    emit(f"[{job.name}] {status} in {secs:.0f} s {tok} {mfu} {mem} {extra}".rstrip())
    if rc != 0:
        emit("  " + "\n  ".join(out.strip().splitlines()[-25:]))


def mfu_verdict(name: str, row: dict) -> str:
    if name not in MFU_TARGETS or "perf/mfu" not in row:
        return ""
    target = MFU_TARGETS[name]
    return f"{'PASS' if row['perf/mfu'] >= target else 'BELOW'} (>= {target:.0%})"


def summary(results, tflops) -> list[str]:
    lines = ["", "== GPU check summary ==",
             f"bf16 matmul: {tflops:.0f} TFLOP/s measured; MFU below is against 989e12" if tflops else "smoke run (CPU)",
             f"{'job':<22} {'status':<8} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9} {'plan GiB':>9}  MFU target"]
    for job, rc, secs, row, est in results:
        lines.append(
            f"{job.name:<22} {'ok' if rc == 0 else 'FAIL':<8} {row.get('perf/tokens_per_s', float('nan')):>12,.0f} "
            f"{row.get('perf/mfu', float('nan')):>7.1%} {row.get('perf/peak_mem_gib', float('nan')):>9.1f} "
            f"{est if est is not None else float('nan'):>9.1f}  {mfu_verdict(job.name, row)}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
