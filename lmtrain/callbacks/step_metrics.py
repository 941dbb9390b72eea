"""Training metrics on logging steps only (the one place a host sync is allowed), logged once per
step under one naming scheme, and a plain progress line when stdout is not a terminal."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class StepMetrics(L.Callback):
    def __init__(
        self,
        *,
        log_every_steps: int,
        max_steps: int,
        tokens_per_step: int | None,
        flops_per_token: float,
        peak_flops_per_device: float | None,
        tokens_per_byte: float | None,
        print_lines: bool,
    ) -> None:
        self.log_every_steps, self.max_steps = log_every_steps, max_steps
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops_per_device, self.tokens_per_byte = peak_flops_per_device, tokens_per_byte
        self.print_lines = print_lines
        self._t0 = 0.0
        self._step0 = 0
        self._tokens_seen = 0.0  # counted per batch when batches are padded examples (tokens_per_step None)
        self.history: list[dict] = []  # rank 0's logged rows, for the end-of-run summary

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not stepped or not (step % self.log_every_steps == 0 or step >= self.max_steps) or step == self._step0:
            return
        pl_module.check_finite()
        loss = pl_module.pop_train_loss()  # host sync: the step's work is done when it returns
        now = time.perf_counter()
        step_s = (now - self._t0) / (step - self._step0)
        if self.tokens_per_step is None:
            tokens = pl_module.pop_tokens()  # real (not padding) tokens since the last logged step
            self._tokens_seen += tokens
            tokens_per_s = tokens / (now - self._t0)
            seen = {"data/samples_seen": float(trainer.datamodule.consumed_samples())}
        else:
            tokens_per_s = self.tokens_per_step / step_s
            seen = {"data/tokens_seen": float(trainer.datamodule.consumed_samples() * self.tokens_per_step
                                              // trainer.datamodule.global_batch_size)}
        metrics = {
            "train/loss": loss,
            "opt/lr": trainer.optimizers[0].param_groups[0]["lr"],
            "perf/step_s": step_s,
            "perf/tokens_per_s": tokens_per_s,
            **seen,
        }
        if (grad_norm := pl_module.current_grad_norm()) is not None:
            metrics["opt/grad_norm"] = grad_norm
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if self.peak_flops_per_device:
            metrics["perf/mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops_per_device * trainer.world_size)
        self._t0, self._step0 = now, step
        self.emit(trainer, metrics, step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not pl_module.last_val:
            return
        metrics = dict(pl_module.last_val)
        if self.tokens_per_byte is not None:
            metrics["val/bpb"] = metrics["val/loss"] / math.log(2) * self.tokens_per_byte
        self.emit(trainer, metrics, trainer.global_step)

    def emit(self, trainer: L.Trainer, metrics: dict, step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if trainer.is_global_zero:
            self.history.append({"step": step, **metrics})
            if self.print_lines or "val/loss" in metrics:
                rank_zero_info(format_line(step, self.max_steps, metrics))
        if trainer.progress_bar_callback is not None and "train/loss" in metrics:
            trainer.progress_bar_callback.train_progress_bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")


def format_line(step: int, max_steps: int, metrics: dict) -> str:
    shown = {
        "train/loss": "loss {:.4f}",
        "val/loss": "val_loss {:.4f}",
        "val/ppl": "ppl {:.2f}",
        "val/bpb": "bpb {:.3f}",
        "val/masked_acc": "masked_acc {:.3f}",
        "val/accuracy": "acc {:.3f}",
        "val/macro_f1": "macro_f1 {:.3f}",
        "val/exact_match": "EM {:.1f}",
        "val/f1": "F1 {:.1f}",
        "val/bleu": "BLEU {:.1f}",
        "opt/lr": "lr {:.2e}",
        "opt/grad_norm": "gnorm {:.2f}",
        "perf/tokens_per_s": "{:,.0f} tok/s",
        "perf/mfu": "mfu {:.1%}",
        "perf/peak_mem_gib": "mem {:.1f} GiB",
    }
    parts = [fmt.format(metrics[k]) for k, fmt in shown.items() if k in metrics]
    return f"step {step}/{max_steps} | " + " | ".join(parts)
