"""`lmtrain train`: one typed config in, a run directory out.

run() validates everything it can before compute is spent, builds the data, task and trainer,
resumes from the newest valid checkpoint of the run, trains, and prints a summary and a sample.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.utilities.exceptions import SIGTERMException
import torch
import yaml

from lmtrain.callbacks.checkpoint import StepCheckpoint
from lmtrain.callbacks.collectives import collective_counter
from lmtrain.callbacks.step_metrics import StepMetrics
from lmtrain.callbacks.stop import RequeueExit, StopOnSignal
from lmtrain.checkpoint import (
    AtomicCheckpointIO,
    Layout,
    check_compatible,
    find_resume_checkpoint,
    list_step_checkpoints,
    load_record,
    resolve_checkpoint,
)
from lmtrain.checkpoint.faults import set_run_name
from lmtrain.checkpoint.io import remove_stale_temp_files
from lmtrain.checkpoint.owner import RunDirOwner
from lmtrain.checkpoint.universal import needs_universal, prepare_universal
from lmtrain.config import TrainConfig, TrainerConfig
from lmtrain.data.shards import TokenSpace
from lmtrain.data.tokenizers import TOKENIZER_FILE, load_tokenizer
from lmtrain.distributed.parallelize import ParallelPlan, build_plan, on_cpu
from lmtrain.distributed.preemption import requeue_signal
from lmtrain.distributed.rank import is_rank_zero, quiet_third_party_hints, say
from lmtrain.distributed.slurm_env import check_slurm_environment, in_slurm_job
from lmtrain.distributed.config import Family
from lmtrain.distributed.strategy import build_strategy
from lmtrain.inference import sample_text
from lmtrain.loggers import build_loggers, load_wandb_state, new_wandb_run_id
from lmtrain.tasks.base import TaskModule
from lmtrain.tasks.config import TaskKind
from lmtrain.trained import load_trained
from lmtrain.train_inputs import (
    RunInputs,
    build_task,
    checkpoint_record,
    init_weights_from,
    model_config_dict,
    run_inputs,
)

# Dense bf16 peak FLOP/s by device-name fragment; Lightning 2.6 does not know the H200.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(trainer: TrainerConfig) -> float | None:
    if trainer.peak_flops_per_device:
        return trainer.peak_flops_per_device
    if torch.cuda.is_available() and trainer.accelerator != "cpu":
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return None


def unigram_entropy(tokens: TokenSpace, vocab_size: int) -> float:
    """Entropy (nats/token) of the token distribution: the loss of the best context-free model."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for chunk in tokens.chunks():
        counts += np.bincount(chunk, minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def choose_checkpoint(cfg: TrainConfig, ckpt_dir: Path, task: TaskModule, layout: Layout) -> Path | None:
    checks = {"world_size": cfg.trainer.world_size, "layout": layout, "seed": cfg.seed,
              "tokenizer_hash": task.record["tokenizer_hash"]}
    match cfg.resume:
        case "never":
            if list_step_checkpoints(ckpt_dir):
                raise ValueError(
                    f"resume=never but {ckpt_dir} already holds checkpoints; choose a new run_name, or resume=auto"
                )
            return None
        case "auto":
            removed = remove_stale_temp_files(ckpt_dir) if is_rank_zero() else []
            for path in removed:
                say(f"removed {path.name}: left by a checkpoint write that was interrupted")
            return find_resume_checkpoint(ckpt_dir, task, **checks)
        case path:
            path = resolve_checkpoint(path)  # Lightning loads the step checkpoint a last.ckpt names
            check_compatible(path, task, **checks)
            return path


def write_run_files(run_dir: Path, record: dict, inputs: RunInputs, hydra_files: dict[str, str]) -> None:
    if not is_rank_zero():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    for name, text in hydra_files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    tokenizer_dir = run_dir / "tokenizer"
    if inputs.data_dir is None:  # fine-tuning: the backbone's (or a byte) tokenizer, saved as it is
        inputs.tokenizer.save(tokenizer_dir)
        return
    tokenizer_dir.mkdir(exist_ok=True)
    for name in (TOKENIZER_FILE, "tokenizer_config.json"):  # the config names the eos token
        if (inputs.data_dir / name).is_file():
            (tokenizer_dir / name).write_bytes((inputs.data_dir / name).read_bytes())


def resolve_wandb_run(cfg: TrainConfig, run_dir: Path, ckpt_path: Path | None) -> tuple[int, str | None]:
    """(the step resumed from, the W&B run id): one W&B run per lmtrain run, its id carried in
    every checkpoint and in the run dir."""
    resumed = load_record(ckpt_path) if ckpt_path else {}
    run_id = resumed.get("lmtrain", {}).get("wandb_run_id") or load_wandb_state(run_dir).get("run_id")
    if cfg.logger.wandb and run_id is None:
        run_id = new_wandb_run_id()
    return int(resumed.get("global_step", 0)), run_id


def run(cfg: TrainConfig, record: dict, run_dir: Path, *, hydra_files: dict[str, str] | None = None) -> None:
    """Train into run_dir, which rank 0 owns (one live writer per run dir) until it returns.
    hydra_files: {relative path: text} of the invocation's record (.hydra/), written by the owner."""
    set_run_name(run_dir.name)
    quiet_third_party_hints()
    check_slurm_environment(devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    owner = RunDirOwner(run_dir, log=say) if is_rank_zero() else None
    try:
        train(cfg, record, run_dir, hydra_files or {})
    finally:
        if owner is not None:
            owner.release()


def check_accelerator(tcfg: TrainerConfig) -> None:
    if tcfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={tcfg.accelerator} but this machine has no usable CUDA GPU (torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda}); use trainer.accelerator=cpu or auto")


def train(cfg: TrainConfig, record: dict, run_dir: Path, hydra_files: dict[str, str]) -> None:
    started = time.perf_counter()
    tcfg = cfg.trainer
    check_accelerator(tcfg)
    if warning := cfg.schedule.warmup_warning(tcfg.max_steps):
        say(warning)
    plan = build_plan(cfg.strategy, tcfg)
    if cfg.init_from:  # its weights are loaded into the built model before the trainer exists
        plan = dataclasses.replace(plan, meta_init=False)
    kind = plan.kind
    if plan.family is Family.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"strategy={kind.name} needs DeepSpeed: pip install 'lmtrain[deepspeed]' (DS_BUILD_OPS=0 needs no compiler)")
    inputs = run_inputs(cfg)
    model_cfg = inputs.model_cfg
    # The model actually built: its vocabulary from the data, or (fine-tuning from init_from) the backbone's config.
    record = {**record, "model": model_config_dict(model_cfg)}

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build_task(cfg, inputs, checkpoint_record(record, inputs, kind, tcfg.world_size, cfg.task.kind), plan)
    ckpt_path = choose_checkpoint(cfg, run_dir / "checkpoints", task, plan.checkpoint_layout)
    # A DeepSpeed checkpoint of another world size loads through DeepSpeed's universal checkpoint.
    universal = ckpt_path is not None and needs_universal(ckpt_path, tcfg.world_size)
    resume_step, task.record["wandb_run_id"] = resolve_wandb_run(cfg, run_dir, ckpt_path)
    if check_resume_step(resume_step, tcfg.max_steps, run_dir):
        return
    if cfg.init_from and ckpt_path is None:
        init_weights_from(task, cfg.init_from, inputs.tokenizer_hash)
    elif cfg.init_from:
        say(f"init_from={cfg.init_from} is not used: the run resumes from its own checkpoint {ckpt_path} "
            "(init_from only starts a new run; choose a new run_name to start from it)")
    trainer, metrics = build_trainer(cfg, task, run_dir, inputs, plan, record=record, resume_step=resume_step,
                                     load_universal=universal)
    write_run_files(run_dir, record, inputs, hydra_files)
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    say(
        f"run {run_dir} | task {cfg.task.kind.name} | model {model_cfg.name}: {task.model.num_parameters():,} parameters"
        + (f" ({trainable:,} trainable)" if trainable < task.model.num_parameters() else "")
        + f" | {inputs.description} | global batch {tcfg.resolved_global_batch_size()} x "
        f"{tcfg.seq_len} tokens (micro {tcfg.micro_batch_size} x {tcfg.world_size} ranks x {tcfg.accumulation()} "
        f"accumulation) | strategy {kind.name} | precision {trainer.precision}"
        + (f" | resuming from {ckpt_path}" if ckpt_path else "")
    )
    if universal:  # after build_trainer, which chose DeepSpeed's accelerator (DS_ACCELERATOR) before this imports it
        # Rank 0 converts (once); the others wait for it on the filesystem: no process group exists yet.
        prepare_universal(ckpt_path, rank_zero=is_rank_zero(), stall_s=cfg.strategy.timeout_s, log=say)
    fit(trainer, task, inputs, ckpt_path, run_dir)
    if trainer.global_step < tcfg.max_steps:
        raise RuntimeError(
            f"training stopped at step {trainer.global_step} before trainer.max_steps={tcfg.max_steps} without an error; "
            "the data loader ran dry: check the prepared data"
        )
    if trainer.is_global_zero:
        summarize(cfg, task, metrics, inputs, time.perf_counter() - started, run_dir, trainer.global_step)


def fit(trainer: L.Trainer, task: TaskModule, inputs: RunInputs, ckpt_path: Path | None, run_dir: Path) -> None:
    """trainer.fit; a run stopped by a signal exits non-zero saying where it stopped (a SLURM requeue
    keeps its own exit)."""
    max_steps = trainer.max_steps
    try:
        trainer.fit(task, datamodule=inputs.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # StopOnSignal: saved and stopped at the step boundary the ranks agreed on
        raise SystemExit(report_stop("SIGTERM", trainer.global_step, max_steps, run_dir, 128 + signal.SIGTERM)) from None
    except SystemExit as e:
        if isinstance(e, RequeueExit) or e.code != 1 or not trainer.interrupted:
            raise
        # Lightning ends a Ctrl-C (SIGINT) with sys.exit(1).
        raise SystemExit(report_stop("SIGINT", trainer.global_step, max_steps, run_dir, 128 + signal.SIGINT)) from None
    if trainer.interrupted:
        raise SystemExit(report_stop("an interruption", trainer.global_step, max_steps, run_dir, 130))


def check_resume_step(resume_step: int, max_steps: int, run_dir: Path) -> bool:
    """True when the run is already done (nothing to train); raises when its checkpoint is beyond max_steps."""
    if resume_step > max_steps:
        raise ValueError(
            f"run {run_dir.name} is already at step {resume_step}, beyond trainer.max_steps={max_steps}; raise "
            f"trainer.max_steps above {resume_step} to continue it, or choose a new run_name (a checkpoint is never rolled back)"
        )
    if resume_step == max_steps and max_steps > 0:
        say(f"run {run_dir.name} is already trained to step {resume_step} = trainer.max_steps; nothing to do "
            "(raise trainer.max_steps to continue it)")
        return True
    return False


def report_stop(reason: str, step: int, max_steps: int, run_dir: Path, exit_code: int) -> int:
    """Say where a run that did not reach max_steps stopped and how to continue it; the exit code."""
    saved = list_step_checkpoints(run_dir / "checkpoints")
    where = (f"the newest checkpoint is step {saved[0][0]} ({saved[0][1]})" if saved
             else "no checkpoint was written yet")
    say(f"lmtrain: training stopped by {reason} at step {step} of {max_steps}; {where}. Continue it with the same "
        f"command (run_name={run_dir.name}, resume=auto)")
    return exit_code


def build_trainer(cfg: TrainConfig, task: TaskModule, run_dir: Path, inputs: RunInputs, plan: ParallelPlan, *,
                  record: dict, resume_step: int, load_universal: bool = False) -> tuple[L.Trainer, StepMetrics]:
    """load_universal: the run resumes a DeepSpeed checkpoint of another world size through its
    universal conversion (lmtrain.checkpoint.universal)."""
    tcfg = cfg.trainer
    strategy = build_strategy(cfg.strategy, world_size=tcfg.world_size, devices_per_node=tcfg.devices,
                              micro_batch_size=tcfg.micro_batch_size, grad_clip=tcfg.grad_clip, on_cpu=on_cpu(tcfg),
                              load_universal=load_universal)
    progress_bar = sys.stdout.isatty() if tcfg.progress_bar is None else tcfg.progress_bar
    checkpoints = StepCheckpoint(run_dir / "checkpoints", every_n_steps=tcfg.ckpt_every_steps,
                                 keep_last=tcfg.keep_last_checkpoints, layout=plan.checkpoint_layout)
    cluster_callbacks, plugins = build_cluster_hooks(checkpoints if tcfg.checkpoint else None)
    metrics = StepMetrics(
        log_every_steps=tcfg.log_every_steps, max_steps=tcfg.max_steps,
        tokens_per_step=tcfg.resolved_global_batch_size() * tcfg.seq_len if cfg.task.kind.pretraining else None,
        flops_per_token=task.model.flops_per_token(tcfg.seq_len), peak_flops_per_device=peak_flops(tcfg),
        tokens_per_byte=inputs.tokens_per_byte, print_lines=not progress_bar,
    )
    accumulate = tcfg.accumulation()
    views = build_view_callbacks(cfg, run_dir, inputs)
    trainer = L.Trainer(
        accelerator=tcfg.accelerator, devices=tcfg.devices, num_nodes=tcfg.num_nodes, strategy=strategy,
        precision=plan.precision, max_steps=tcfg.max_steps, max_epochs=-1, accumulate_grad_batches=accumulate,
        val_check_interval=tcfg.val_every_steps * accumulate, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # our sampler deals disjoint, resumable slices itself
        logger=build_loggers(cfg.logger, run_dir, record=record, wandb_run_id=task.record["wandb_run_id"],
                             resume_step=resume_step),
        enable_checkpointing=False, callbacks=[metrics, *([checkpoints] if tcfg.checkpoint else []), *views, *cluster_callbacks,
                   *collective_counter(), *peer_watchdog(cfg)],
        plugins=[AtomicCheckpointIO(), *plugins], enable_progress_bar=progress_bar, enable_model_summary=False,
        default_root_dir=run_dir, log_every_n_steps=tcfg.log_every_steps,
    )
    return trainer, metrics


def peer_watchdog(cfg: TrainConfig) -> list:
    """[the watchdog] when several ranks train and strategy.peer_timeout_s is on."""
    if cfg.trainer.world_size < 2 or not cfg.strategy.peer_timeout_s:
        return []
    from lmtrain.distributed.watchdog import PeerWatchdog

    return [PeerWatchdog(cfg.strategy.peer_timeout_s)]


def build_view_callbacks(cfg: TrainConfig, run_dir: Path, inputs: RunInputs) -> list:
    """The inspect views every logger.inspect_every_steps and the lm-eval scores every
    harness.every_steps (none when both are 0)."""
    if not (cfg.logger.inspect_every_steps or cfg.harness.every_steps):
        return []
    # causal_lm loads no tokenizer for training; every rank has the prepared data's.
    tokenizer = inputs.tokenizer or load_tokenizer(inputs.data_dir / TOKENIZER_FILE, eos_token=inputs.eos_token)
    callbacks = []
    if cfg.logger.inspect_every_steps:
        from lmtrain.callbacks.inspect import InspectEveryN

        callbacks.append(InspectEveryN(cfg.logger.inspect_every_steps, cfg.logger.inspect_text, run_dir / "inspect",
                                       tokenizer, cfg.task.kind, seq_len=cfg.trainer.seq_len,
                                       label_names=inputs.task_info.get("label_names")))
    if cfg.harness.every_steps:
        from lmtrain.callbacks.harness import HarnessEveryN

        callbacks.append(HarnessEveryN(cfg.harness, tokenizer, run_dir / "harness", seed=cfg.seed))
    return callbacks


def build_cluster_hooks(checkpoints: StepCheckpoint | None) -> tuple[list, list]:
    """Stopping on SIGTERM at an agreed step boundary, and under srun lmtrain's own requeue-on-signal
    (save outside the signal handler, at a step boundary) instead of Lightning's, which saves inside
    the handler."""
    if not (in_slurm_job() and "SLURM_STEP_ID" in os.environ):
        return [StopOnSignal(checkpoints, requeue_signum=None)], []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    max_requeues = int(os.environ.get("LMTRAIN_MAX_REQUEUES", "50"))
    requeue_signum = requeue_signal() if checkpoints is not None else None
    return [StopOnSignal(checkpoints, requeue_signum=requeue_signum, max_requeues=max_requeues)], [SLURMEnvironment(auto_requeue=False)]


def summarize(cfg: TrainConfig, task: TaskModule, metrics: StepMetrics, inputs: RunInputs, seconds: float,
              run_dir: Path, step: int) -> None:
    tcfg = cfg.trainer
    val = [row for row in metrics.history if "val/loss" in row]
    print(f"\ntrained to step {step} in {seconds:.0f} s; run dir {run_dir}")
    if val and cfg.task.kind is TaskKind.causal_lm:
        last = val[-1]
        sources = [f"{k.removeprefix('val/').removesuffix('/loss')} {v:.4f}" for k, v in last.items()
                   if k.startswith("val/") and k.endswith("/loss") and k != "val/loss"]
        if sources:  # a mixture: no single byte count or token distribution to compare with
            print(f"val loss {last['val/loss']:.4f} nats/token (mixture-weighted; {', '.join(sources)})")
        else:
            entropy = unigram_entropy(inputs.prepared.val, inputs.model_cfg.padded_vocab_size)
            print(
                f"val loss {last['val/loss']:.4f} nats/token (ppl {last['val/ppl']:.2f}, {last['val/bpb']:.3f} "
                f"bits/byte) vs unigram entropy of the val tokens {entropy:.4f} nats/token"
            )
    elif val:
        print("val " + " | ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in val[-1].items() if k.startswith("val/")))
    if cfg.task.kind is not TaskKind.causal_lm or not (run_dir / "checkpoints" / "last.ckpt").exists():
        return  # trainer.checkpoint=false: nothing to sample from
    # From the final checkpoint rather than the live model: under ZeRO-3 or FSDP rank 0 holds
    # only a shard, and this also proves the checkpoint loads for `lmtrain generate`.
    trained = load_trained(run_dir / "checkpoints" / "last.ckpt", "cpu")
    sample = sample_text(trained.model, trained.tokenizer, tcfg.sample_prompt, tcfg.sample_tokens)
    print("\n--- sample ---\n" + sample + "\n--------------")
