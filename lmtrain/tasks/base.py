"""What every lmtrain task shares: the model, device-side loss accumulators, the cross-rank NaN
check, clipping, the optimizer and schedule, per-step reseeding and RNG state in checkpoints.

A task subclass says how a batch becomes a loss (`training_loss`) and what validation measures.
"""

from __future__ import annotations

import math
import random
import lightning as L
import numpy as np
import torch

from lmtrain.checkpoint.faults import maybe_crash
from lmtrain.distributed.config import StrategyKind
from lmtrain.distributed.parallelize import ParallelPlan, build_transformer, parallelize
from lmtrain.model import ModelConfig
from lmtrain.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler


def step_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    """The RNG seed of one micro batch: a pure function of where training is, so dropout after a
    resume is exactly what it would have been without the interruption."""
    return (seed * 1_000_003 + step * 10_007 + micro_step * 101 + rank) % (2**63)


class TaskModule(L.LightningModule):
    def __init__(
        self,
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig,
        schedule_cfg: ScheduleConfig,
        *,
        max_steps: int,
        seed: int,
        grad_clip: float,
        accumulate: int,
        record: dict | None = None,
        layer_lr_decay: float = 1.0,
        plan: ParallelPlan | None = None,
    ) -> None:
        """plan: how the model is parallelized (lmtrain.distributed.parallelize); None = one process."""
        super().__init__()
        self.layer_lr_decay = layer_lr_decay
        self.model_cfg, self.optim_cfg, self.schedule_cfg = model_cfg, optim_cfg, schedule_cfg
        self.max_steps, self.seed, self.grad_clip, self.accumulate = max_steps, seed, grad_clip, accumulate
        self.record = record or {}  # resolved config etc., written into every checkpoint
        # How the model is parallelized, applied in configure_model once processes exist.
        self.plan = plan or ParallelPlan(kind=StrategyKind.single, precision="32-true")
        # Drawn from the global RNG (seeded by the run's seed) whether or not the model is built now.
        self.init_seed = int(torch.randint(0, 2**62, ()).item())
        self.model = build_transformer(model_cfg, self.plan, seed=self.init_seed)
        # Device-side accumulators: read (a host sync) only on logging steps.
        self.register_buffer("_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("_loss_count", torch.zeros(()), persistent=False)
        self.register_buffer("_first_bad_step", torch.tensor(-1), persistent=False)
        self.register_buffer("_val_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.grad_norm: torch.Tensor | None = None
        self.last_val: dict[str, float] = {}
        self._parallelized = False
        self._sharded_roots: list[torch.nn.Module] = []  # FSDP2 roots, after parallelize
        self._reseed = True  # decided on fit start (draws_random_numbers)

    def on_fit_start(self) -> None:
        # Device-side accumulators, read (a host sync) only on logging steps. Plain attributes, not
        # buffers: a bf16-true or DeepSpeed bf16 module cast would make them bf16, where a count
        # stops at 256.
        zeros = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731 - local shorthand
        self._loss_sum, self._loss_count = zeros(torch.float64), zeros(torch.float64)
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._val_loss_sum, self._val_tokens = zeros(torch.float64), zeros(torch.float64)
        self._step_on_device = torch.zeros((), dtype=torch.int64, device=self.device)
        self._tokens = zeros(torch.float64)
        self._reseed = self.draws_random_numbers()

    # -- LM validation, per source of the data (causal_lm, masked_lm) ---------------------------
    def start_source_val(self) -> None:
        n_sources = len(self.trainer.datamodule.sources)
        self._val_by_source = torch.zeros((2, n_sources), dtype=torch.float64, device=self.device)  # loss sum, count

    def add_source_val(self, source: torch.Tensor, loss_sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Per row of a val batch: its source (-1: a filler row, scored as nothing), loss sum and count."""
        keep = source >= 0
        self._val_by_source[0].index_add_(0, source[keep], loss_sums[keep].double())
        self._val_by_source[1].index_add_(0, source[keep], counts[keep].double())

    def source_val_losses(self) -> dict[str, float]:
        """val/loss over every rank; for a mixture also val/<source>/loss, and val/loss is their mean
        weighted by the mixture weights."""
        totals = self.trainer.strategy.reduce(self._val_by_source.clone(), reduce_op="sum")
        losses = (totals[0] / totals[1].clamp(min=1)).tolist()
        weights = self.trainer.datamodule.val_weights()
        if not weights:
            return {"val/loss": losses[0]}
        result = {f"val/{name}/loss": loss for name, loss in zip(weights, losses)}
        result["val/loss"] = sum(weight * loss for weight, loss in zip(weights.values(), losses))
        return result

    def on_train_start(self) -> None:
        # A resumed run continues the logging window the checkpoint was in: the first train/loss it
        # logs averages the same micro batches as the uninterrupted run's (restored here, after
        # every strategy has restored its state).
        window = getattr(self, "_resumed_window", None)
        if window is not None:
            self._loss_sum.fill_(float(window[0]))
            self._loss_count.fill_(float(window[1]))
            self._tokens.fill_(float(window[2]))
            self._resumed_window = None

    def configure_model(self) -> None:
        if self._parallelized:
            return
        self.model = parallelize(self.model, self.plan, world_size=self.trainer.world_size,
                                 device=self.trainer.strategy.root_device, init_seed=self.init_seed,
                                 heads=self.head_modules())
        self._parallelized = True
        from torch.distributed.fsdp import FSDPModule

        self._sharded_roots = [m for m in (self.model, *self.head_modules()) if isinstance(m, FSDPModule)]

    def head_modules(self) -> list[torch.nn.Module]:
        """Trainable modules outside `self.model` (task heads): FSDP shards them as units of their own."""
        return []

    def training_loss(self, batch) -> torch.Tensor:
        """The mean loss of one micro batch."""
        raise NotImplementedError

    def batch_tokens(self, batch) -> torch.Tensor | None:
        """Real (not padding) input tokens of a micro batch, for tokens/s; None where every step
        has the same count (packed windows)."""
        return None

    def lr_depth(self, name: str) -> int:
        """Depth of a parameter below the top for layer-wise LR decay (0 = head and final norm)."""
        n_layers = self.model.cfg.n_layers
        parts = name.split(".")
        if parts[0] != "model":
            return 0
        if parts[1] == "blocks":
            return n_layers - int(parts[2])
        if parts[1] in ("tok_embeddings", "pos_embeddings"):
            return n_layers + 1
        return 0

    # -- training ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        maybe_crash(self.global_rank, self.global_step)
        if self._reseed:
            seed = step_seed(self.seed, self.global_step, batch_idx % self.accumulate, self.global_rank)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        if self.accumulate > 1 and self._sharded_roots:
            # FSDP2 reduce-scatters gradients only after the last micro batch of a step; the others
            # accumulate unsharded gradients locally (Lightning skips the sync for DDP only).
            last = (batch_idx + 1) % self.accumulate == 0
            for module in self._sharded_roots:
                module.set_requires_gradient_sync(last)

    def draws_random_numbers(self) -> bool:
        """Whether a training step uses the RNGs (dropout; masked_lm's masking overrides this): only then
        is every micro batch reseeded from (seed, step, micro step, rank) for an exact resume (a
        torch.manual_seed also reseeds every CUDA device, a cost not worth paying for nothing)."""
        return self.model_cfg.dropout > 0 or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.modules())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        if (tokens := self.batch_tokens(batch)) is not None:
            self._tokens += tokens
        detached = loss.detach()
        self._loss_sum += detached
        self._loss_count += 1
        bad = ~torch.isfinite(detached) & (self._first_bad_step < 0)
        self._step_on_device.fill_(self.global_step + 1)  # fill_ with a Python int: no host-to-device copy, no sync
        self._first_bad_step.copy_(torch.where(bad, self._step_on_device, self._first_bad_step))
        return loss

    def pop_train_loss(self) -> float:
        """Mean micro-batch loss since the last call, over all ranks (a collective and a host sync)."""
        mean = self._loss_sum / self._loss_count.clamp(min=1)
        loss = self.trainer.strategy.reduce(mean, reduce_op="mean").item()
        self._loss_sum.zero_()
        self._loss_count.zero_()
        return loss

    def pop_tokens(self) -> float | None:
        """Real input tokens over all ranks since the last call (a collective), or None for packed windows."""
        if self.batch_tokens.__func__ is TaskModule.batch_tokens:
            return None
        total = self.trainer.strategy.reduce(self._tokens.clone(), reduce_op="sum").item()
        self._tokens.zero_()
        return total

    def check_finite(self) -> None:
        """Raise on every rank if any rank saw a NaN/Inf loss (a collective and a host sync): one
        rank raising alone would leave the others waiting in the next collective until timeout."""
        worst = self.trainer.strategy.reduce(self._first_bad_step.clone(), reduce_op="max")
        bad = int(worst.item())
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite training loss (NaN or Inf) at step {bad}; stopped without saving a checkpoint, "
                "the last good one is kept. Lower optim.lr, raise schedule.warmup_steps, keep trainer.grad_clip > 0, "
                "or use bf16 rather than fp16"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.plan.engine_clips:
            return  # DeepSpeed clips inside its engine (gradient_clipping in its config)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        self.grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor

    def current_grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm (a host sync)."""
        if self.plan.engine_clips:
            norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        return None if self.grad_norm is None else self.grad_norm.item()

    def configure_optimizers(self):
        if self.layer_lr_decay == 1.0 and not self.head_modules():
            optimizer = build_optimizer(self.model, self.optim_cfg)  # the groups pretraining checkpoints hold
        else:
            optimizer = build_optimizer(self, self.optim_cfg, depth_of=self.lr_depth, layer_lr_decay=self.layer_lr_decay)
        scheduler = build_scheduler(optimizer, self.schedule_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never write a checkpoint of a model that saw a NaN
        window = torch.stack([self._loss_sum, self._loss_count, self._tokens]).double().cpu()
        checkpoint["lmtrain"] = {**self.record, "rng": gather_rank_states(self.trainer, loss_window=window)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        align_micro_batch_progress(checkpoint, self.accumulate)
        rng = checkpoint.get("lmtrain", {}).get("rng")
        restore_rng_state(rng, self.global_rank)
        if rng and len(rng["per_rank"]) == self.trainer.world_size and "loss_window" in rng["per_rank"][self.global_rank]:
            self._resumed_window = rng["per_rank"][self.global_rank]["loss_window"]
        # The peak lr (and the layer-wise decay) follow the current config on resume, like the
        # schedule's shape does.
        for opt, sched in zip(checkpoint.get("optimizer_states", []), checkpoint.get("lr_schedulers", [])):
            lrs = [self.optim_cfg.lr * self.layer_lr_decay ** group.get("lr_depth", 0) for group in opt.get("param_groups", [])]
            for group, lr in zip(opt.get("param_groups", []), lrs):
                group["initial_lr"] = lr
            if len(lrs) == len(sched.get("base_lrs", [])):
                sched["base_lrs"] = lrs


def align_micro_batch_progress(checkpoint: dict, accumulate: int) -> None:
    """Lightning counts micro batches and steps the optimizer when the count reaches a multiple of
    the accumulation. A checkpoint from a run with another accumulation (other ranks or micro batch
    at the same global batch) would leave the count off a multiple: the first step after the resume
    would take too few micro batches and every later one would be shifted. Restate the counts as
    this run's micro batches for the same optimizer steps (checkpoints are taken at step boundaries)."""
    steps = checkpoint.get("global_step", 0)
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not steps or not progress or "total" not in progress:
        return
    processed = progress["total"].get("processed", 0)
    if processed % steps or processed // steps == accumulate:
        return  # not at a step boundary, or the same accumulation: nothing to restate
    shift = steps * accumulate - processed
    for counts in (progress["total"], progress.get("current", {})):
        if counts.get("processed", 0) + shift < 0:
            continue
        for key in ("ready", "started", "processed", "completed"):
            if key in counts:
                counts[key] += shift


def gather_rank_states(trainer: L.Trainer, *, loss_window: torch.Tensor) -> dict:
    """Every rank's torch/cuda/numpy/python RNG and its unlogged loss window (sum, count, tokens),
    as tensors and plain lists (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    mine = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": py_version,
        "loss_window": loss_window,
    }
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return {"per_rank": gathered}
    return {"per_rank": [mine]}


def restore_rng_state(rng: dict | None, rank: int) -> None:
    if not rng or rank >= len(rng["per_rank"]):
        return  # a different world size: per-step reseeding makes this state unnecessary anyway
    mine = rng["per_rank"][rank]
    torch.set_rng_state(mine["torch"])
    if torch.cuda.is_available() and mine["cuda"].numel():
        torch.cuda.set_rng_state(mine["cuda"])
    np.random.set_state(("MT19937", mine["numpy"].numpy().astype(np.uint32), mine["numpy_pos"], 0, 0.0))
    random.setstate((mine["python_version"], tuple(mine["python"].tolist()), None))
