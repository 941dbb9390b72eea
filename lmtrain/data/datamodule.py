"""The causal-LM DataModule: train windows in a resumable global order, a fixed val subset.

Its state is the number of global samples consumed, derived from the optimizer step rather
than from the loader, because loaders (and their workers) read ahead of training.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lmtrain.data.sampler import TrainWindowStream, ValWindows, count_windows


class LMDataModule(L.LightningDataModule):
    def __init__(
        self,
        prepared_dir: Path,
        *,
        dtype: str,
        n_train_tokens: int,
        n_val_tokens: int,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        val_batches: int,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.prepared_dir = Path(prepared_dir)
        self.dtype, self.n_train_tokens, self.n_val_tokens = dtype, n_train_tokens, n_val_tokens
        self.seq_len, self.micro_batch_size, self.global_batch_size = seq_len, micro_batch_size, global_batch_size
        self.seed, self.val_batches, self.num_workers = seed, val_batches, num_workers
        self._start_samples = 0  # global samples consumed when this fit started (from a checkpoint)
        self._start_step = 0
        check_split_sizes(n_train_tokens, n_val_tokens, seq_len, self.prepared_dir)

    # -- position ----------------------------------------------------------------------------
    def consumed_samples(self) -> int:
        return self._start_samples + (self.trainer.global_step - self._start_step) * self.global_batch_size

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self.consumed_samples(),
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_train_windows": count_windows(self.n_train_tokens, self.seq_len),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or state["n_train_windows"] != count_windows(self.n_train_tokens, self.seq_len):
            raise ValueError(
                f"the checkpoint's data position was taken with seq_len={state['seq_len']} over "
                f"{state['n_train_windows']} windows, but this run has seq_len={self.seq_len} over "
                f"{count_windows(self.n_train_tokens, self.seq_len)}; resume with the same data and trainer.seq_len, "
                "or start a new run (init from its weights) to change them"
            )
        self._start_samples = int(state["consumed_samples"])

    # -- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self._start_step = self.trainer.global_step  # restored by now on resume
        stream = TrainWindowStream(
            self.prepared_dir / "train.bin",
            dtype=self.dtype,
            n_tokens=self.n_train_tokens,
            seq_len=self.seq_len,
            micro_batch_size=self.micro_batch_size,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            seed=self.seed,
            start_sample=self._start_samples,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        available = count_windows(self.n_val_tokens, self.seq_len)
        world = self.trainer.world_size
        if available < world:
            raise ValueError(
                f"the val split of {self.prepared_dir} holds {available} windows of trainer.seq_len={self.seq_len}, "
                f"fewer than the {world} ranks: every rank must validate at least one. Raise data.val_fraction "
                "or lower trainer.seq_len"
            )
        wanted = self.val_batches * self.micro_batch_size * world
        # Round down to a multiple of the world size: every rank must run the same number of batches.
        n_windows = min(wanted, available - available % world)
        val = ValWindows(
            self.prepared_dir / "val.bin",
            dtype=self.dtype,
            n_tokens=self.n_val_tokens,
            seq_len=self.seq_len,
            n_windows=n_windows,
            rank=self.trainer.global_rank,
            world_size=world,
        )
        return DataLoader(val, batch_size=self.micro_batch_size, shuffle=False, num_workers=0)


def check_split_sizes(n_train_tokens: int, n_val_tokens: int, seq_len: int, prepared_dir: Path) -> None:
    for split, n in (("train", n_train_tokens), ("val", n_val_tokens)):
        if count_windows(n, seq_len) == 0:
            raise ValueError(
                f"the {split} split of {prepared_dir} holds {n} tokens, fewer than trainer.seq_len+1 = {seq_len + 1}: "
                f"nothing to {'train' if split == 'train' else 'validate'} on. Use more data "
                f"({'data.val_fraction' if split == 'val' else 'data.paths'}) or a smaller trainer.seq_len"
            )
