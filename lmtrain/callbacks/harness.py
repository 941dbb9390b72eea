"""Downstream scores during training: lm-eval tasks every N optimizer steps, logged as
harness/<task>/<metric> to every logger (metrics.jsonl included, so `lmtrain sweep` can optimize
one) and written to <run>/harness/step-NNNNNNNN.json."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from lmtrain.callbacks.checkpoint import step_checkpoint_name
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.config import HarnessTrainConfig
from lmtrain.harness import check_tasks, evaluate, preserved_rng, scores
from lmtrain.inspection import eager_blocks, is_sharded


class HarnessEveryN(L.Callback):
    """Unsharded models (single, DDP, ZeRO-1/2) are scored on rank 0 while the other ranks wait at a
    barrier; a sharded one (FSDP, ZeRO-3) on every rank in lockstep (its forwards are collective;
    each rank runs the same requests in the same order), rank 0 logging."""

    def __init__(self, cfg: HarnessTrainConfig, tokenizer: Tokenizer, out_dir: Path, seed: int) -> None:
        self.cfg, self.tokenizer, self.out_dir, self.seed = cfg, tokenizer, Path(out_dir), seed
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        check_tasks(list(self.cfg.tasks), self.cfg.include_path)  # a typo fails now, not after every_steps steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if stepped and step % self.cfg.every_steps == 0 and step != self._last_step:
            self._last_step = step
            self.score(trainer, pl_module, step)

    def score(self, trainer: L.Trainer, pl_module, step: int) -> None:
        model = pl_module.model
        everyone = is_sharded(model)
        flat = None
        if everyone or trainer.is_global_zero:
            was_training = pl_module.training
            pl_module.eval()
            try:
                with eager_blocks(model), preserved_rng():  # lm-eval seeds the global RNGs
                    results = evaluate(model, self.tokenizer, self.cfg, seed=self.seed)
            finally:
                pl_module.train(was_training)
            flat = None if results is None else scores(results)  # None off local rank 0 (lm-eval's choice)
        if not everyone:
            trainer.strategy.barrier("lmtrain_harness")
        if not trainer.is_global_zero or flat is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{Path(step_checkpoint_name(step)).stem}.json"
        path.write_text(json.dumps({"step": step, "scores": flat, "results": results["results"]}, indent=2,
                                   default=str) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics(flat, step)
