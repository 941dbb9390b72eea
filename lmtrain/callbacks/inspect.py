"""The `lmtrain inspect` views of one fixed text every N optimizer steps of a training run:
written under <run>/inspect/step-NNNNNNNN/ and logged as images to W&B and TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lmtrain.callbacks.checkpoint import step_checkpoint_name
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.inspection import eager_blocks, inspect_text
from lmtrain.tasks.config import TaskKind

IMAGE_KEY = "inspect/{name}"  # e.g. inspect/attention, inspect/logit_lens


class InspectEveryN(L.Callback):
    def __init__(self, every_n_steps: int, text: str, out_dir: Path, tokenizer: Tokenizer, kind: TaskKind, *,
                 seq_len: int, label_names: list[str] | None = None) -> None:
        self.every_n_steps, self.text, self.out_dir = every_n_steps, text, Path(out_dir)
        self.tokenizer, self.kind, self.seq_len, self.label_names = tokenizer, kind, seq_len, label_names
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if stepped and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.inspect(trainer, pl_module, step)

    def inspect(self, trainer: L.Trainer, pl_module, step: int) -> None:
        # Every rank runs the forward (a sharded model needs all of them); rank 0 draws and logs.
        was_training = pl_module.training
        pl_module.eval()  # no dropout: the views of step N are a function of the weights alone
        try:
            with eager_blocks(pl_module.model), torch.random.fork_rng(devices=[]):
                result = inspect_text(pl_module, self.kind, self.tokenizer, self.text, seq_len=self.seq_len,
                                      label_names=self.label_names)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        from lmtrain.inspect_views import write_views

        out = self.out_dir / Path(step_checkpoint_name(step)).stem  # step-NNNNNNNN, as `lmtrain inspect` names it
        written = write_views(result, self.tokenizer, out, title=f"step {step}")
        images = {path.stem: path for path in written if path.suffix == ".png"}
        for logger in trainer.loggers:
            log_images(logger, images, step)


def log_images(logger, images: dict[str, Path], step: int) -> None:
    """PNG files to the loggers that take images (W&B, TensorBoard); the others have them on disk."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        logger.log_metrics({IMAGE_KEY.format(name=name): wandb.Image(str(path)) for name, path in images.items()}, step)
    elif isinstance(logger, TensorBoardLogger):
        from matplotlib.image import imread

        for name, path in images.items():
            logger.experiment.add_image(IMAGE_KEY.format(name=name), imread(path)[..., :3], step, dataformats="HWC")
        logger.experiment.flush()
