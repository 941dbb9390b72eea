"""Tokens/s of lmtrain's training step against a plain PyTorch loop over the same work.

Both sides train the same `build_model` model (same seed, so the same init, checked), with the
same AdamW parameter groups (`build_optimizer`), the same LambdaLR schedule (`build_scheduler`),
gradient clipping at 1.0 and the same batches (a `TrainWindowStream` DataLoader over a token file
of Python standard-library source bytes, each file a document ended by EOS_ID, written to a temp dir).
Precision is 32-true on CPU and bf16-mixed on a GPU with bf16, as `lmtrain train` resolves it.

- lmtrain: `CausalLMTask` + `LMDataModule` in a `lightning.Trainer` built with `lmtrain train`'s
  arguments and its per-step callbacks (`StepMetrics` at conf/trainer/default.yaml's log cadence,
  `StepCheckpoint` at a cadence beyond the run, the jsonl logger). Validation and checkpoint saves
  are not training-step work and fall outside the measured steps.
- plain: next(batch) -> forward -> cross entropy -> backward -> clip_grad_norm_ ->
  optimizer.step -> scheduler.step -> zero_grad.

Method: one `trainer.fit` per model. A timing callback (after the others) acts in
`on_train_batch_end`: once the Trainer's warmup steps are done it warms the plain loop up, then
repeats, --repeats times: [run and time --steps plain steps] [time --steps Trainer steps]. So the
two sides alternate in one process and machine noise hits both alike; Trainer construction and
fit setup are outside every timed segment, and each segment spans the same number of whole step
cycles on both sides (device synchronised at every boundary). The table reports the median
tokens/s per side and their ratio. At the end both models must hold the same weights: the max
parameter difference is printed as evidence that both sides did the same work.

Attention (--attention-models): the cost of model.attention=document. Two plain loops over the same
batches from the same init, one with attention=causal and one with attention=document (its kernel as
`auto` picks it: sdpa with a boolean mask on CPU, FlexAttention on CUDA), alternate in the same way:
warmup steps on each, then --repeats x [causal segment][document segment]. The table reports the
median tokens/s of each and document / causal.

    python benchmarks/throughput.py                       # tiny and ~20M, CPU (or CUDA if present)
    python benchmarks/throughput.py --steps 10 --repeats 1 --models tiny --attention-models tiny   # a quick look
    python benchmarks/throughput.py --models --attention-models tiny 20m   # document masking only

Run it alone: another CPU-bound process on the machine adds noise to both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
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
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader

from lmtrain.callbacks.checkpoint import StepCheckpoint
from lmtrain.callbacks.step_metrics import StepMetrics
from lmtrain.checkpoint import AtomicCheckpointIO
from lmtrain.config import TrainerConfig
from lmtrain.data.datamodule import LMDataModule, LMSource
from lmtrain.data.sampler import TrainWindowStream, WindowSampler
from lmtrain.data.shards import TokenSpace
from lmtrain.distributed.config import StrategyConfig
from lmtrain.distributed.strategy import build_strategy
from lmtrain.loggers import LoggerConfig, build_loggers
from lmtrain.model import Attention, ModelConfig, build_model
from lmtrain.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler
from lmtrain.tasks.causal_lm import CausalLMTask
from lmtrain.train import peak_flops, resolve_precision

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TARGET_RATIO = 0.97
SEED = 1337  # TrainConfig.seed
GRAD_CLIP = 1.0
EOS_ID = 256  # after the byte ids, inside both models' vocabularies


@dataclass
class BenchCase:
    model_cfg: ModelConfig
    seq_len: int
    micro_batch_size: int

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size


def build_cases() -> dict[str, BenchCase]:
    tiny = yaml.safe_load((CONF_DIR / "model" / "tiny.yaml").read_text())
    tiny = ModelConfig(**{**tiny, "vocab_size": 4096})
    # ~20M parameters; d_ff = 8/3 d_model keeps tiny's swiglu proportions.
    medium = ModelConfig(
        name="bench_20m", vocab_size=8192, d_model=384, n_layers=8, n_heads=6, d_ff=1024, max_seq_len=256,
    )
    return {"tiny": BenchCase(tiny, seq_len=128, micro_batch_size=16), "20m": BenchCase(medium, seq_len=256, micro_batch_size=8)}


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


def train_stream_loader(data_dir: Path, n_train_tokens: int, case: BenchCase) -> DataLoader:
    """The loader `LMDataModule.train_dataloader` builds for one rank at the start of training."""
    sampler = WindowSampler(TokenSpace.single(data_dir / "train.bin", n_train_tokens, "uint16"), case.seq_len, SEED)
    stream = TrainWindowStream(sampler, micro_batch_size=case.micro_batch_size, rank=0, world_size=1, start_sample=0)
    return DataLoader(stream, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())


# -- the plain side ------------------------------------------------------------------------------
class PlainLoop:
    """A hand-written training loop over its own copy of the model, optimizer and schedule."""

    def __init__(self, case: BenchCase, batches: Iterator[torch.Tensor], device: torch.device, bf16: bool, max_steps: int):
        torch.manual_seed(SEED)  # what seed_everything does for the task's build_model
        self.model = build_model(case.model_cfg).to(device).train()
        self.optimizer = build_optimizer(self.model, OptimConfig())
        self.scheduler = build_scheduler(self.optimizer, ScheduleConfig(), max_steps)
        self.batches, self.device, self.bf16 = batches, device, bf16

    def run(self, n_steps: int) -> None:
        for _ in range(n_steps):
            batch = next(self.batches).to(self.device, non_blocking=True)  # (B, T + 1)
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(inputs)  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
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
        started = time.perf_counter()
        self.plain.run(self.steps)
        self.synchronize()
        return time.perf_counter() - started


# -- the lmtrain side ----------------------------------------------------------------------------
def build_trainer(case: BenchCase, task: CausalLMTask, tcfg: TrainerConfig, run_dir: Path, timer: SegmentTimer) -> L.Trainer:
    """`lmtrain.train.run`'s Trainer, for one device, with validation and saves beyond max_steps."""
    beyond = tcfg.max_steps + 1
    strategy = build_strategy(StrategyConfig(), world_size=1, devices_per_node=1, micro_batch_size=case.micro_batch_size,
                              grad_clip=tcfg.grad_clip, on_cpu=tcfg.accelerator == "cpu")
    metrics = StepMetrics(
        log_every_steps=tcfg.log_every_steps, max_steps=tcfg.max_steps, tokens_per_step=case.tokens_per_step,
        flops_per_token=task.model.flops_per_token(case.seq_len), peak_flops_per_device=peak_flops(tcfg),
        tokens_per_byte=1.0, print_lines=True,  # one token per byte; lines as when stdout is no terminal
    )
    return L.Trainer(
        accelerator=tcfg.accelerator, devices=1, num_nodes=1, strategy=strategy,
        precision=resolve_precision(tcfg), max_steps=tcfg.max_steps, max_epochs=-1, accumulate_grad_batches=1,
        val_check_interval=beyond, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        use_distributed_sampler=False, logger=build_loggers(LoggerConfig(), run_dir, record={}, wandb_run_id=None), enable_checkpointing=False,
        callbacks=[metrics, StepCheckpoint(run_dir / "checkpoints", every_n_steps=beyond, keep_last=1), timer],
        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=run_dir, log_every_n_steps=tcfg.log_every_steps,
    )


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


def trainer_config(case: BenchCase, args: argparse.Namespace) -> TrainerConfig:
    log_every = yaml.safe_load((CONF_DIR / "trainer" / "default.yaml").read_text())["log_every_steps"]
    return TrainerConfig(
        max_steps=args.warmup_steps + args.repeats * args.steps, seq_len=case.seq_len,
        micro_batch_size=case.micro_batch_size, accelerator="gpu" if args.device == "cuda" else "cpu",
        log_every_steps=log_every, grad_clip=GRAD_CLIP,
    )


def bench_case(name: str, case: BenchCase, args: argparse.Namespace, data_dir: Path, n_train_tokens: int) -> CaseResult:
    tcfg = trainer_config(case, args)
    max_steps = tcfg.max_steps
    device = torch.device(args.device)
    L.seed_everything(SEED, workers=True, verbose=False)
    task = CausalLMTask(
        case.model_cfg, OptimConfig(), ScheduleConfig(), max_steps=max_steps, seed=SEED, grad_clip=GRAD_CLIP, accumulate=1,
    )
    plain = PlainLoop(case, iter(train_stream_loader(data_dir, n_train_tokens, case)), device,
                      bf16=resolve_precision(tcfg) == "bf16-mixed", max_steps=max_steps)
    check_same_init(task.model, plain.model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timer = SegmentTimer(plain, warmup_steps=args.warmup_steps, steps=args.steps, repeats=args.repeats, synchronize=sync)
    source = LMSource("bench", data_dir, TokenSpace.single(data_dir / "train.bin", n_train_tokens, "uint16"),
                      TokenSpace.single(data_dir / "val.bin", args.val_tokens, "uint16"))
    datamodule = LMDataModule(
        [source], seq_len=case.seq_len, micro_batch_size=case.micro_batch_size, global_batch_size=case.micro_batch_size,
        seed=SEED, val_batches=1,
    )
    with tempfile.TemporaryDirectory(prefix=f"lmtrain-bench-{name}-") as run_dir:
        trainer = build_trainer(case, task, tcfg, Path(run_dir), timer)
        trainer.fit(task, datamodule=datamodule)
    if len(timer.lmtrain_s) != args.repeats:
        raise RuntimeError(f"{name}: timed {len(timer.lmtrain_s)} lmtrain segments of {args.repeats}; the fit stopped early")
    tokens = args.steps * case.tokens_per_step
    return CaseResult(
        name, task.model.num_parameters(), [tokens / s for s in timer.plain_s], [tokens / s for s in timer.lmtrain_s],
        max_param_diff(task.model, plain.model),
    )


def check_same_init(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if not torch.equal(x.cpu(), y.cpu()):
            raise RuntimeError(f"the two sides start from different weights at {key}: the benchmark is not comparing like with like")


def max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Both on the CPU: Lightning moves its model back there when fit ends."""
    return max((x.detach().cpu().float() - y.detach().cpu().float()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


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
    tcfg = trainer_config(case, args)
    device = torch.device(args.device)
    bf16 = resolve_precision(tcfg) == "bf16-mixed"
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
        loop.run(args.warmup_steps)
    sync()
    for _ in range(args.repeats):
        for attention, loop in loops.items():
            started = time.perf_counter()
            loop.run(args.steps)
            sync()
            seconds[attention].append(time.perf_counter() - started)
    tokens = args.steps * case.tokens_per_step
    return AttentionResult(name, documents_per_window, [tokens / s for s in seconds["causal"]],
                           [tokens / s for s in seconds["document"]])


# -- report --------------------------------------------------------------------------------------
def print_report(results: list[CaseResult]) -> None:
    print(f"\n{'model':<10} {'params':>12} {'plain tok/s':>12} {'lmtrain tok/s':>14} {'ratio':>7}  target {TARGET_RATIO}")
    for r in results:
        verdict = "PASS" if r.ratio >= TARGET_RATIO else "BELOW"
        print(
            f"{r.name:<10} {r.n_params:>12,} {statistics.median(r.plain_tokens_per_s):>12,.0f} "
            f"{statistics.median(r.lmtrain_tokens_per_s):>14,.0f} {r.ratio:>7.3f}  {verdict}"
        )
    print("\nper segment, in run order (tok/s):")
    for r in results:
        pairs = ", ".join(f"{p:,.0f}/{m:,.0f}" for p, m in zip(r.plain_tokens_per_s, r.lmtrain_tokens_per_s))
        print(f"  {r.name:<8} plain/lmtrain: {pairs}")
        print(f"  {r.name:<8} max |parameter difference| between the sides after training: {r.max_param_diff:.3g}")


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
    a deprecation inside Lightning's own pytree use (lightning 2.6 with torch >= 2.10)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=["tiny", "20m"], default=["tiny", "20m"],
                        help="models whose lmtrain step is timed against the plain loop")
    parser.add_argument("--attention-models", nargs="*", choices=["tiny", "20m"], default=["tiny", "20m"],
                        help="models timed with model.attention=causal against attention=document")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per timed segment; default 25 on cpu, 200 on cuda. A multiple of "
                        "conf/trainer/default.yaml's log_every_steps gives every lmtrain segment the same logging steps")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of (plain segment, lmtrain segment)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="untimed steps per side before the first segment")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="train tokens in the token file")
    parser.add_argument("--val-tokens", type=int, default=65_536)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 200 if args.device == "cuda" else 25
    for name in ("steps", "repeats", "warmup_steps", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if not args.models and not args.attention_models:
        parser.error("--models and --attention-models are both empty: name at least one model to time")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    quiet_lightning()
    cases = build_cases()
    print(
        f"device {args.device} | {torch.get_num_threads()} threads | torch {torch.__version__} | lightning {L.__version__} | "
        f"{args.warmup_steps} warmup steps, then {args.repeats} x (plain, lmtrain) segments of {args.steps} steps",
        flush=True,
    )
    results, attention_results = [], []
    with tempfile.TemporaryDirectory(prefix="lmtrain-bench-data-") as data_dir:
        write_token_files(Path(data_dir), args.tokens, args.val_tokens)
        for name in args.models:
            case = cases[name]
            print(f"{name}: {case.micro_batch_size} x {case.seq_len} tokens per step ...", flush=True)
            results.append(bench_case(name, case, args, Path(data_dir), args.tokens))
        for name in args.attention_models:
            case = cases[name]
            print(f"{name}, attention causal vs document: {case.micro_batch_size} x {case.seq_len} tokens per step ...", flush=True)
            attention_results.append(bench_attention(name, case, args, Path(data_dir), args.tokens))
    if results:
        print_report(results)
    if attention_results:
        print_attention_report(attention_results)
    sys.exit(0)  # a measurement, not a test: BELOW is reported, not failed


if __name__ == "__main__":
    main()
