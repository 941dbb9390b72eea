"""Tokens/s of lmtrain's training step against a plain PyTorch loop over the same work.

Both sides train the same `build_model` model (same seed, so the same init, checked), with the
same AdamW parameter groups (`build_optimizer`), the same LambdaLR schedule (`build_scheduler`),
gradient clipping at 1.0 and the same batches (a `TrainWindowStream` DataLoader over a token file
of Python standard-library source bytes, each file a document ended by EOS_ID, written to a temp dir).
Precision is 32-true on CPU and bf16-mixed on a GPU with bf16, as `lmtrain train` resolves it.

- lmtrain: what `lmtrain train` builds, through its own functions: the `CausalLMTask` of
  `train_inputs.build_task` and the `lightning.Trainer` of `lmtrain.train.build_trainer` (the strategy
  of `build_strategy`, the precision, and every per-step callback a run gets: `StepMetrics` at
  conf/trainer/default.yaml's log cadence, `StepCheckpoint` at a cadence beyond the run, the jsonl
  logger, under DDP the peer watchdog), over an `LMDataModule`. So a change to lmtrain's step is
  measured without a change here. Validation and checkpoint saves are not training-step work: their
  cadence lies beyond the run, and the save at the end of fit comes after the last timed segment.
- plain: next(batch) -> forward -> cross entropy -> backward -> clip_grad_norm_ ->
  optimizer.step -> scheduler.step -> zero_grad.

Cases, each a row of one table (plain tok/s, lmtrain tok/s, ratio lmtrain / plain):
- --models M..: one process, --threads threads. gpt2_124m is conf/model/gpt2_124m.yaml (124M
  parameters) at 2 x 256 tokens a step; a step takes seconds on a CPU, so there it defaults to 3
  warmup steps and 5 x segments of 3 steps (~90 s on 2 cores).
- --accumulate-models M..: gradient accumulation, --accumulate (4) micro batches per optimizer step:
  `trainer.global_batch_size` = 4 x micro batch on the lmtrain side (Lightning's
  accumulate_grad_batches, as `lmtrain train` derives it), loss / 4 backward per micro batch in the
  plain loop. Row `<model>/acc4`; its tokens count every micro batch.
- --ddp-models M..: DDP on --ranks (2) processes, gloo on CPU (nccl on CUDA), which this script starts
  as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT,
  TORCHELASTIC_RUN_ID), each with --threads / --ranks threads (1 on 2 cores). lmtrain: strategy=ddp
  (`build_strategy`'s DDPStrategy); plain: the model in torch's DistributedDataParallel with the same
  options (broadcast_buffers=False), on the process group Lightning set up. Every rank reads its own
  slice of each global batch, as `LMDataModule` deals them; every segment starts and ends at a
  barrier; rank 0 times and reports. Row `<model>/ddp2`; its tokens count every rank's.

Memory: by default (--malloc keep) glibc's malloc keeps freed memory for reuse, as CUDA's caching
allocator does, instead of mapping every large tensor afresh: otherwise the page faults of a large
model's step on CPU depend on what the other side left allocated, and the comparison is skewed
(gpt2_124m read 1.17-1.20 for lmtrain / plain: the plain loop, 15% slower interleaved than alone).

Method: one `trainer.fit` per case. A timing callback (after the others) acts in
`on_train_batch_end` at optimizer-step boundaries: once the Trainer's warmup steps are done it warms
the plain loop up, then repeats, --repeats times: [run and time --steps plain steps] [time --steps
Trainer steps]. So the two sides alternate in one process and machine noise hits both alike;
Trainer construction and fit setup are outside every timed segment, and each segment spans the same
number of whole step cycles on both sides (device synchronised at every boundary). The table reports
the median tokens/s per side and their ratio. At the end both models must hold the same weights: the
max parameter difference is printed as evidence that both sides did the same work.

Attention (--attention-models): the cost of model.attention=document. Two plain loops over the same
batches from the same init, one with attention=causal and one with attention=document (its kernel as
`auto` picks it: sdpa with a boolean mask on CPU, FlexAttention on CUDA), alternate in the same way:
warmup steps on each, then --repeats x [causal segment][document segment]. The table reports the
median tokens/s of each and document / causal.

With no case option, the default run is --models tiny 20m --attention-models tiny 20m; naming any
case option runs only the cases named. --smoke: every case at toy size (its model kinds and
vocabulary at 2 layers of width 32, 2 x 32 tokens), 1 warmup step, 1 segment of 2 steps: the
suite's check that each case still runs, not a measurement.

    python benchmarks/throughput.py                       # tiny and ~20M, CPU (or CUDA if present)
    python benchmarks/throughput.py --steps 10 --repeats 1 --models tiny --attention-models tiny   # a quick look
    python benchmarks/throughput.py --attention-models tiny 20m   # document masking only
    python benchmarks/throughput.py --ddp-models tiny     # 2 ranks of DDP
    python benchmarks/throughput.py --accumulate-models tiny   # gradient accumulation 4
    python benchmarks/throughput.py --models gpt2_124m    # a GPT-2 small step (~90 s on 2 cores)

Run it alone: another CPU-bound process on the machine adds noise to both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from lmtrain import train as lmtrain_train
from lmtrain.config import TrainConfig, TrainerConfig
from lmtrain.data.datamodule import LMDataModule, LMSource
from lmtrain.data.sampler import TrainWindowStream, WindowSampler
from lmtrain.data.shards import TokenSpace
from lmtrain.distributed.config import StrategyConfig, StrategyKind
from lmtrain.distributed.parallelize import build_plan
from lmtrain.distributed.rank import quiet_third_party_hints
from lmtrain.model import Attention, ModelConfig, build_model
from lmtrain.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler
from lmtrain.tasks.causal_lm import CausalLMTask
from lmtrain.train_inputs import RunInputs, build_task, checkpoint_record

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TARGET_RATIO = {"cpu": 0.98, "cuda": 0.97}  # issue 14's targets for lmtrain/plain
SEED = 1337  # TrainConfig.seed
GRAD_CLIP = 1.0
EOS_ID = 256  # after the byte ids, inside every model's vocabulary
MODELS = ("tiny", "20m", "gpt2_124m")
DEFAULT_MODELS = ["tiny", "20m"]


@dataclass
class BenchCase:
    model_cfg: ModelConfig
    seq_len: int
    micro_batch_size: int
    cpu_timing: tuple[int, int, int] | None = None
    """(warmup steps, steps per segment, repeats) on a CPU, where the script's defaults would take too long."""

    @property
    def tokens_per_step(self) -> int:
        """Of one micro batch on one rank."""
        return self.seq_len * self.micro_batch_size


def load_preset(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text()), **overrides})


def smoke_model(cfg: ModelConfig) -> ModelConfig:
    """The same kind of model (positions, norm, MLP, vocabulary, ties, biases) at toy width and depth."""
    return dataclasses.replace(cfg, name=f"{cfg.name}_smoke", d_model=32, n_layers=2, n_heads=2, n_kv_heads=None, d_ff=64)


def build_cases(smoke: bool = False) -> dict[str, BenchCase]:
    tiny = load_preset("tiny", vocab_size=4096)
    # ~20M parameters; d_ff = 8/3 d_model keeps tiny's swiglu proportions.
    medium = ModelConfig(
        name="bench_20m", vocab_size=8192, d_model=384, n_layers=8, n_heads=6, d_ff=1024, max_seq_len=256,
    )
    gpt2 = load_preset("gpt2_124m")  # its own vocabulary (50,257) holds the byte ids and EOS_ID
    cases = {
        "tiny": BenchCase(tiny, seq_len=128, micro_batch_size=16),
        "20m": BenchCase(medium, seq_len=256, micro_batch_size=8),
        "gpt2_124m": BenchCase(gpt2, seq_len=256, micro_batch_size=2, cpu_timing=(3, 3, 5)),
    }
    if smoke:
        cases = {name: BenchCase(smoke_model(case.model_cfg), seq_len=32, micro_batch_size=2) for name, case in cases.items()}
    return cases


@dataclass(frozen=True)
class Timing:
    warmup_steps: int
    steps: int
    repeats: int

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.repeats * self.steps

    def describe(self) -> str:
        return f"{self.warmup_steps} warmup steps, then {self.repeats} x (plain, lmtrain) segments of {self.steps} steps"


def resolve_timing(case: BenchCase, args: argparse.Namespace) -> Timing:
    """--warmup-steps, --steps and --repeats where given; else the smoke sizes, the case's own CPU
    sizes, or 10 warmup steps and 5 x segments of 25 steps (CPU) or 200 steps (CUDA)."""
    if args.smoke:
        defaults = (1, 2, 1)
    elif args.device == "cpu" and case.cpu_timing is not None:
        defaults = case.cpu_timing
    else:
        defaults = (10, 200 if args.device == "cuda" else 25, 5)
    given = (args.warmup_steps, args.steps, args.repeats)
    return Timing(*(value if value is not None else default for value, default in zip(given, defaults)))


# -- memory --------------------------------------------------------------------------------------
def keep_freed_memory() -> str:
    """glibc's malloc: tensors up to 1 GiB from the heap rather than each a fresh mmap, and freed memory
    kept rather than given back to the OS (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), as CUDA's caching
    allocator keeps it. By default glibc maps every block above its mmap threshold (32 MB at most)
    afresh and the kernel zero-fills it page by page at first touch: on gpt2_124m that is ~1.5 GB of
    page faults a step (its 154 MB embedding gradient, 103 MB of logits gradient, AdamW's temporaries),
    and how much of it a side pays depends on what the other side's step left allocated. Measured on 2
    cores: interleaved, the plain loop ran at 193-195 tok/s against 220-227 alone (lmtrain / plain
    1.17-1.20); with this, 273 and 277 tok/s (1.015). tiny/acc4 went from 9,174 / 9,146 to 10,300 /
    10,381 tok/s. Returns what was set, for the header line."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "malloc as is (no glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    # An older glibc refuses a threshold above 32 MiB (HEAP_MAX_SIZE / 2); that still helps smaller models.
    threshold = next((t for t in (1 << 30, 32 << 20) if mallopt(m_mmap_threshold, t)), None)
    if threshold is None or not mallopt(m_trim_threshold, 2**31 - 1):
        return "malloc as is (mallopt refused)"
    return f"malloc keeps freed memory (mmap threshold {threshold >> 20} MiB, no trim)"


# -- data ----------------------------------------------------------------------------------------
def write_token_files(directory: Path, n_train_tokens: int, n_val_tokens: int) -> None:
    """train.bin and val.bin: the standard library's .py files, one document each, as uint16 token ids:
    the file's bytes (< 256), then EOS_ID."""
    wanted = n_train_tokens + n_val_tokens
    chunks, total = [], 0
    for path in sorted(Path(os.__file__).parent.rglob("*.py")):
        chunks.append(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16))
        chunks.append(np.array([EOS_ID], dtype=np.uint16))
        total += len(chunks[-2]) + 1
        if total >= wanted:
            break
    if total < wanted:
        raise RuntimeError(f"the standard library holds {total:,} tokens of .py source, fewer than {wanted:,}; lower --tokens")
    tokens = np.concatenate(chunks)[:wanted]
    tokens[:n_train_tokens].tofile(directory / "train.bin")
    tokens[n_train_tokens:].tofile(directory / "val.bin")


def train_stream_loader(data_dir: Path, n_train_tokens: int, case: BenchCase, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """The loader `LMDataModule.train_dataloader` builds for one rank at the start of training."""
    sampler = WindowSampler(TokenSpace.single(data_dir / "train.bin", n_train_tokens, "uint16"), case.seq_len, SEED)
    stream = TrainWindowStream(sampler, micro_batch_size=case.micro_batch_size, rank=rank, world_size=world_size, start_sample=0)
    return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())


# -- the plain side ------------------------------------------------------------------------------
class PlainLoop:
    """A hand-written training loop over its own copy of the model, optimizer and schedule.
    accumulate: micro batches per optimizer step (loss / accumulate backward each). distributed: the
    model in torch's DistributedDataParallel on the default process group, wrapped at the first step
    (the group exists by then); gradients are reduced at the last micro batch of a step only."""

    def __init__(self, case: BenchCase, batches: Iterator[torch.Tensor], device: torch.device, bf16: bool, max_steps: int,
                 *, accumulate: int = 1, distributed: bool = False):
        torch.manual_seed(SEED)  # what seed_everything does for the task's build_model
        self.model = build_model(case.model_cfg).to(device).train()
        self.optimizer = build_optimizer(self.model, OptimConfig())
        self.scheduler = build_scheduler(self.optimizer, ScheduleConfig(), max_steps)
        self.batches, self.device, self.bf16 = batches, device, bf16
        self.accumulate, self.distributed = accumulate, distributed
        self.module: torch.nn.Module | None = None  # what forward runs through: the model or its DDP wrapper

    def wrap(self) -> torch.nn.Module:
        if not self.distributed:
            return self.model
        # As Lightning's DDPStrategy wraps lmtrain's module with build_strategy's options.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False,
                                                         find_unused_parameters=False)

    def run(self, n_steps: int) -> None:
        if self.module is None:
            self.module = self.wrap()
        for _ in range(n_steps):
            for micro in range(self.accumulate):
                no_sync = self.distributed and micro < self.accumulate - 1
                with self.module.no_sync() if no_sync else contextlib.nullcontext():
                    batch = next(self.batches).to(self.device, non_blocking=True)  # (B, T + 1)
                    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                        logits = self.module(inputs)  # (B, T, V)
                        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                    (loss / self.accumulate if self.accumulate > 1 else loss).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)


# -- alternation ---------------------------------------------------------------------------------
class SegmentTimer(L.Callback):
    """Times Trainer segments of `steps` optimizer steps and runs a timed plain segment before each."""

    def __init__(self, plain: PlainLoop, *, warmup_steps: int, steps: int, repeats: int, synchronize: Callable[[], None]):
        self.plain, self.warmup_steps, self.steps, self.repeats = plain, warmup_steps, steps, repeats
        self.synchronize = synchronize
        self.plain_s: list[float] = []
        self.lmtrain_s: list[float] = []
        self._started = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not the last micro batch of an optimizer step
        done = trainer.global_step - self.warmup_steps
        if done < 0 or done % self.steps:
            return
        self.synchronize()
        if done > 0:
            self.lmtrain_s.append(time.perf_counter() - self._started)
        else:
            self.plain.run(self.warmup_steps)
        if len(self.lmtrain_s) < self.repeats:
            self.plain_s.append(self.time_plain_segment())
            self._started = time.perf_counter()

    def time_plain_segment(self) -> float:
        self.synchronize()
        started = time.perf_counter()
        self.plain.run(self.steps)
        self.synchronize()
        return time.perf_counter() - started


def synchronizer(device: torch.device, distributed: bool) -> Callable[[], None]:
    """Waits for the device, and under DDP for every rank: a segment boundary is the same moment everywhere."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if distributed:
            dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()

    return synchronize


# -- the lmtrain side ----------------------------------------------------------------------------
def lmtrain_config(case: BenchCase, timing: Timing, args: argparse.Namespace, *, world_size: int, accumulate: int) -> TrainConfig:
    """The config `lmtrain train` would run: conf/trainer/default.yaml's log cadence, validation and
    checkpoints beyond max_steps, strategy ddp on several ranks (as strategy=auto picks), plain lines."""
    log_every = yaml.safe_load((CONF_DIR / "trainer" / "default.yaml").read_text())["log_every_steps"]
    beyond = timing.max_steps + 1
    trainer = TrainerConfig(
        max_steps=timing.max_steps, seq_len=case.seq_len, micro_batch_size=case.micro_batch_size,
        global_batch_size=case.micro_batch_size * world_size * accumulate, accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=world_size, log_every_steps=log_every, grad_clip=GRAD_CLIP, val_every_steps=beyond, val_batches=1,
        ckpt_every_steps=beyond, keep_last_checkpoints=1, progress_bar=False,
    )
    strategy = StrategyConfig(kind=StrategyKind.ddp if world_size > 1 else StrategyKind.auto)
    return TrainConfig(model=case.model_cfg, optim=OptimConfig(), schedule=ScheduleConfig(), strategy=strategy,
                       trainer=trainer, seed=SEED)


def build_lmtrain_side(cfg: TrainConfig, data_dir: Path, n_train_tokens: int, n_val_tokens: int,
                       run_dir: Path) -> tuple[CausalLMTask, L.Trainer, LMDataModule]:
    """lmtrain.train.train's construction of the task and Trainer (its plan, build_task, build_trainer),
    over the benchmark's token files."""
    tcfg = cfg.trainer
    source = LMSource("bench", data_dir, TokenSpace.single(data_dir / "train.bin", n_train_tokens, "uint16"),
                      TokenSpace.single(data_dir / "val.bin", n_val_tokens, "uint16"))
    datamodule = LMDataModule(
        [source], seq_len=tcfg.seq_len, micro_batch_size=tcfg.micro_batch_size,
        global_batch_size=tcfg.resolved_global_batch_size(), seed=cfg.seed, val_batches=tcfg.val_batches,
        num_workers=tcfg.num_workers,
    )
    inputs = RunInputs(cfg.model, None, "benchmark", "<eos>", datamodule, "benchmark tokens", data_dir=data_dir,
                       tokens_per_byte=1.0)  # one token per byte
    plan = build_plan(cfg.strategy, tcfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build_task(cfg, inputs, checkpoint_record({}, inputs, plan.kind, tcfg.world_size, cfg.task.kind), plan)
    task.record["wandb_run_id"] = None
    trainer, _ = lmtrain_train.build_trainer(cfg, task, run_dir, inputs, plan, record={}, resume_step=0)
    return task, trainer, datamodule


@dataclass
class CaseResult:
    name: str
    n_params: int
    plain_tokens_per_s: list[float]
    lmtrain_tokens_per_s: list[float]
    max_param_diff: float

    @property
    def ratio(self) -> float:
        return statistics.median(self.lmtrain_tokens_per_s) / statistics.median(self.plain_tokens_per_s)


def row_name(model: str, *, world_size: int = 1, accumulate: int = 1) -> str:
    return model + (f"/ddp{world_size}" if world_size > 1 else "") + (f"/acc{accumulate}" if accumulate > 1 else "")


def compute_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def bench_case(name: str, case: BenchCase, args: argparse.Namespace, data_dir: Path, n_train_tokens: int, run_dir: Path,
               *, world_size: int = 1, rank: int = 0, accumulate: int = 1) -> CaseResult:
    timing = resolve_timing(case, args)
    cfg = lmtrain_config(case, timing, args, world_size=world_size, accumulate=accumulate)
    device = compute_device(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    task, trainer, datamodule = build_lmtrain_side(cfg, data_dir, n_train_tokens, args.val_tokens, run_dir)
    batches = iter(train_stream_loader(data_dir, n_train_tokens, case, rank=rank, world_size=world_size))
    plain = PlainLoop(case, batches, device, bf16=trainer.precision == "bf16-mixed", max_steps=timing.max_steps,
                      accumulate=accumulate, distributed=world_size > 1)
    check_same_init(task.model, plain.model)
    timer = SegmentTimer(plain, warmup_steps=timing.warmup_steps, steps=timing.steps, repeats=timing.repeats,
                         synchronize=synchronizer(device, world_size > 1))
    trainer.callbacks.append(timer)  # after lmtrain's own: a segment ends when they are done with its last step
    trainer.fit(task, datamodule=datamodule)
    row = row_name(name, world_size=world_size, accumulate=accumulate)
    if len(timer.lmtrain_s) != timing.repeats:
        raise RuntimeError(f"{row}: timed {len(timer.lmtrain_s)} lmtrain segments of {timing.repeats}; the fit stopped early")
    tokens = timing.steps * case.tokens_per_step * world_size * accumulate
    return CaseResult(
        row, task.model.num_parameters(), [tokens / s for s in timer.plain_s], [tokens / s for s in timer.lmtrain_s],
        max_param_diff(task.model, plain.model),
    )


def check_same_init(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if not torch.equal(x.cpu(), y.cpu()):
            raise RuntimeError(f"the two sides start from different weights at {key}: the benchmark is not comparing like with like")


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Both on the CPU: Lightning moves its model back there when fit ends."""
    return max((x.detach().cpu().float() - y.detach().cpu().float()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


# -- DDP: this script on every rank --------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_ddp(name: str, args: argparse.Namespace, data_dir: Path) -> CaseResult:
    """Start this script on --ranks processes, as torchrun would, to run `rank_main`; rank 0's result."""
    threads = max(1, args.threads // args.ranks)
    forwarded = ["--device", args.device, "--tokens", str(args.tokens), "--val-tokens", str(args.val_tokens),
                 "--threads", str(threads)]
    for flag, value in (("--warmup-steps", args.warmup_steps), ("--steps", args.steps), ("--repeats", args.repeats)):
        if value is not None:
            forwarded += [flag, str(value)]
    forwarded += ["--smoke"] if args.smoke else []
    forwarded += ["--malloc", args.malloc]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"lmtrain-bench-{name}-ddp-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), *forwarded, "--rank-of", name, "--data-dir", str(data_dir),
                   "--run-dir", str(Path(tmp) / "run"), "--result", str(result)]
        common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(args.ranks),
                  "LOCAL_WORLD_SIZE": str(args.ranks), "GROUP_RANK": "0", "NODE_RANK": "0",
                  "TORCHELASTIC_RUN_ID": "lmtrain-benchmark", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        sys.stdout.flush()
        procs = [subprocess.Popen(command, env={**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank in range(args.ranks)]
        wait_for_ranks(procs, what=row_name(name, world_size=args.ranks))
        return CaseResult(**json.loads(result.read_text()))


def wait_for_ranks(procs: list[subprocess.Popen], what: str) -> None:
    """All ranks exit 0, or the first failure ends the others (they would wait in a collective)."""
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            raise RuntimeError(f"{what}: rank {failed[0][0]} exited with {failed[0][1]}")
        if all(code == 0 for code in codes):
            return
        time.sleep(0.2)


def rank_main(args: argparse.Namespace) -> None:
    """One rank of a --ddp-models case (started by bench_ddp); rank 0 writes the result."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.malloc == "keep":
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    quiet_lightning()
    case = build_cases(args.smoke)[args.rank_of]
    result = bench_case(args.rank_of, case, args, Path(args.data_dir), args.tokens, Path(args.run_dir),
                        world_size=world_size, rank=rank)
    if rank == 0:
        Path(args.result).write_text(json.dumps(dataclasses.asdict(result)))


# -- attention: causal against document masking -------------------------------------------------
@dataclass
class AttentionResult:
    name: str
    documents_per_window: float
    causal_tokens_per_s: list[float]
    document_tokens_per_s: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.document_tokens_per_s) / statistics.median(self.causal_tokens_per_s)


def bench_attention(name: str, case: BenchCase, args: argparse.Namespace, data_dir: Path, n_train_tokens: int) -> AttentionResult:
    """Alternating segments of two plain loops that differ only in model.attention."""
    timing = resolve_timing(case, args)
    cfg = lmtrain_config(case, timing, args, world_size=1, accumulate=1)
    tcfg = cfg.trainer
    device = compute_device(args)
    bf16 = build_plan(cfg.strategy, tcfg).precision == "bf16-mixed"  # as lmtrain train resolves it
    document_cfg = dataclasses.replace(case.model_cfg, attention=Attention.document).with_eos(EOS_ID)
    loops = {}
    for attention, model_cfg in (("causal", case.model_cfg), ("document", document_cfg)):
        side = dataclasses.replace(case, model_cfg=model_cfg)
        batches = iter(train_stream_loader(data_dir, n_train_tokens, side))
        loops[attention] = PlainLoop(side, batches, device, bf16=bf16, max_steps=tcfg.max_steps)
    check_same_init(loops["causal"].model, loops["document"].model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = next(iter(train_stream_loader(data_dir, n_train_tokens, case)))[:, :-1]  # (B, T): the windows read first
    documents_per_window = 1.0 + (first == EOS_ID).sum(dim=1).float().mean().item()
    seconds: dict[str, list[float]] = {"causal": [], "document": []}
    for loop in loops.values():
        loop.run(timing.warmup_steps)
    sync()
    for _ in range(timing.repeats):
        for attention, loop in loops.items():
            started = time.perf_counter()
            loop.run(timing.steps)
            sync()
            seconds[attention].append(time.perf_counter() - started)
    tokens = timing.steps * case.tokens_per_step
    return AttentionResult(name, documents_per_window, [tokens / s for s in seconds["causal"]],
                           [tokens / s for s in seconds["document"]])


# -- report --------------------------------------------------------------------------------------
def print_report(results: list[CaseResult], device: str) -> None:
    width = max(10, *(len(r.name) for r in results))
    target = TARGET_RATIO[device]
    print(f"\n{'model':<{width}} {'params':>12} {'plain tok/s':>12} {'lmtrain tok/s':>14} {'ratio':>7}  target {target}")
    for r in results:
        verdict = "PASS" if r.ratio >= target else "BELOW"
        print(
            f"{r.name:<{width}} {r.n_params:>12,} {statistics.median(r.plain_tokens_per_s):>12,.0f} "
            f"{statistics.median(r.lmtrain_tokens_per_s):>14,.0f} {r.ratio:>7.3f}  {verdict}"
        )
    print("\nper segment, in run order (tok/s):")
    for r in results:
        pairs = ", ".join(f"{p:,.0f}/{m:,.0f}" for p, m in zip(r.plain_tokens_per_s, r.lmtrain_tokens_per_s))
        print(f"  {r.name:<{width}} plain/lmtrain: {pairs}")
        print(f"  {r.name:<{width}} max |parameter difference| between the sides after training: {r.max_param_diff:.3g}")


def print_attention_report(results: list[AttentionResult]) -> None:
    print(f"\n{'attention':<10} {'docs/window':>11} {'causal tok/s':>13} {'document tok/s':>15} {'ratio':>7}")
    for r in results:
        print(
            f"{r.name:<10} {r.documents_per_window:>11.2f} {statistics.median(r.causal_tokens_per_s):>13,.0f} "
            f"{statistics.median(r.document_tokens_per_s):>15,.0f} {r.ratio:>7.3f}"
        )
    for r in results:
        pairs = ", ".join(f"{c:,.0f}/{d:,.0f}" for c, d in zip(r.causal_tokens_per_s, r.document_tokens_per_s))
        print(f"  {r.name:<8} causal/document: {pairs}")


def quiet_lightning() -> None:
    """Keep the output to the measurements: Lightning's banner, StepMetrics' lines (still formatted
    on logging steps, as in a real run), its advice about loader workers (both sides use none) and
    a deprecation inside Lightning's own pytree use (lightning 2.6 with torch >= 2.10); lmtrain's own
    hints filter as in `lmtrain train`."""
    quiet_third_party_hints()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    # torch >= 2.13 deprecations met under DDP: broadcast_buffers=False (lmtrain's DDP option, kept on
    # both sides) and the all_gather Lightning's all_gather uses.
    warnings.filterwarnings("ignore", message=".*`broadcast_buffers` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated.*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=MODELS, default=None,
                        help="models whose lmtrain step is timed against the plain loop, one process")
    parser.add_argument("--accumulate-models", nargs="*", choices=MODELS, default=None,
                        help="the same with --accumulate micro batches per optimizer step")
    parser.add_argument("--ddp-models", nargs="*", choices=MODELS, default=None,
                        help="the same on --ranks processes of DDP (gloo on CPU)")
    parser.add_argument("--attention-models", nargs="*", choices=["tiny", "20m"], default=None,
                        help="models timed with model.attention=causal against attention=document")
    parser.add_argument("--accumulate", type=int, default=4, help="micro batches per optimizer step of --accumulate-models")
    parser.add_argument("--ranks", type=int, default=2, help="processes of --ddp-models, each with --threads / --ranks threads")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per timed segment; default 25 on cpu (gpt2_124m: 3), 200 on cuda. A multiple of "
                        "conf/trainer/default.yaml's log_every_steps gives every lmtrain segment the same logging steps")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of (plain segment, lmtrain segment); default 5 "
                        "(gpt2_124m on cpu: 5)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per side before the first segment; "
                        "default 10 (gpt2_124m on cpu: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default every core (--smoke: 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="train tokens in the token file; default 2,000,000 "
                        "(--smoke: 50,000)")
    parser.add_argument("--val-tokens", type=int, default=None, help="default 65,536 (--smoke: 4,096)")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="keep: glibc malloc keeps freed memory for reuse (see keep_freed_memory; CPU allocations of "
                        "both sides alike); default: glibc's own settings")
    parser.add_argument("--smoke", action="store_true",
                        help="every case at toy size, 1 warmup step and 1 segment of 2 steps: does it run (the test suite's check)")
    # One rank of a --ddp-models case, as bench_ddp starts it.
    for internal in ("--rank-of", "--data-dir", "--run-dir", "--result"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or (1 if args.smoke else os.cpu_count() or 1)
    args.tokens = args.tokens or (50_000 if args.smoke else 2_000_000)
    args.val_tokens = args.val_tokens or (4_096 if args.smoke else 65_536)
    for name in ("steps", "repeats", "warmup_steps", "threads", "accumulate", "tokens", "val_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}={value} must be > 0")
    if args.ranks < 2:
        parser.error(f"--ranks={args.ranks}: DDP needs at least 2 processes")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    if args.device == "cuda" and args.ddp_models and torch.cuda.device_count() < args.ranks:
        parser.error(f"--ddp-models on cuda needs --ranks={args.ranks} GPUs; torch sees {torch.cuda.device_count()}")
    if args.rank_of is not None:
        return args
    named = (args.models, args.accumulate_models, args.ddp_models, args.attention_models)
    if all(option is None for option in named):  # the default run
        args.models, args.attention_models = list(DEFAULT_MODELS), list(DEFAULT_MODELS)
    for name in ("models", "accumulate_models", "ddp_models", "attention_models"):
        setattr(args, name, getattr(args, name) or [])
    if not (args.models or args.accumulate_models or args.ddp_models or args.attention_models):
        parser.error("every case option is empty: name at least one model to time")
    return args


def main() -> None:
    args = parse_args()
    if args.rank_of is not None:
        rank_main(args)
        return
    memory = keep_freed_memory() if args.malloc == "keep" else "malloc as is"
    torch.set_num_threads(args.threads)
    quiet_lightning()
    cases = build_cases(args.smoke)
    print(f"device {args.device} | {torch.get_num_threads()} threads | torch {torch.__version__} | lightning {L.__version__} | "
          f"{memory}" + (" | smoke sizes" if args.smoke else ""), flush=True)
    results, attention_results = [], []
    with tempfile.TemporaryDirectory(prefix="lmtrain-bench-data-") as data_dir:
        data_dir = Path(data_dir)
        write_token_files(data_dir, args.tokens, args.val_tokens)
        single = [(name, 1) for name in args.models] + [(name, args.accumulate) for name in args.accumulate_models]
        for name, accumulate in single:
            case, timing = cases[name], resolve_timing(cases[name], args)
            print(f"{row_name(name, accumulate=accumulate)}: {case.micro_batch_size} x {case.seq_len} tokens per micro batch, "
                  f"{accumulate} per step | {timing.describe()} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix=f"lmtrain-bench-{name}-") as run_dir:
                results.append(bench_case(name, case, args, data_dir, args.tokens, Path(run_dir), accumulate=accumulate))
        for name in args.ddp_models:
            case, timing = cases[name], resolve_timing(cases[name], args)
            print(f"{row_name(name, world_size=args.ranks)}: {args.ranks} ranks x {case.micro_batch_size} x {case.seq_len} "
                  f"tokens per step, {max(1, args.threads // args.ranks)} threads each | {timing.describe()} ...", flush=True)
            results.append(bench_ddp(name, args, data_dir))
        for name in args.attention_models:
            case, timing = cases[name], resolve_timing(cases[name], args)
            print(f"{name}, attention causal vs document: {case.micro_batch_size} x {case.seq_len} tokens per step | "
                  f"{timing.describe().replace('(plain, lmtrain)', '(causal, document)')} ...", flush=True)
            attention_results.append(bench_attention(name, case, args, data_dir, args.tokens))
    if results:
        print_report(results, args.device)
    if attention_results:
        print_attention_report(attention_results)
    sys.exit(0)  # a measurement, not a test: BELOW is reported, not failed


if __name__ == "__main__":
    main()
