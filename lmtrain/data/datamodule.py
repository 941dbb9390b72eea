"""The causal-LM DataModule: train windows in a resumable global order, a fixed val subset.

Its state is the number of global samples consumed, derived from the optimizer step rather
than from the loader, because loaders (and their workers) read ahead of training.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lmtrain.data.examples import Collate, Features
from lmtrain.data.sampler import ExampleStream, TrainWindowStream, ValWindows, count_windows, val_shard
from lmtrain.tasks.config import TaskKind


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


class TaskDataModule(L.LightningDataModule):
    """Fine-tuning examples held in memory: the same resumable global order as LMDataModule (a
    seeded permutation per epoch, dealt to ranks by micro batch), batches padded per micro batch.
    Validation shards are evened out across ranks with filler items that are scored as nothing,
    so every rank runs the same number of forward passes (FSDP and ZeRO-3 need that)."""

    def __init__(self, train: Features, val: Features, *, kind: TaskKind, pad_id: int, micro_batch_size: int,
                 global_batch_size: int, seed: int, val_examples: int | None, num_workers: int = 0,
                 tokenizer=None) -> None:
        super().__init__()
        self.train, self.val, self.kind, self.tokenizer = train, val, kind, tokenizer
        self.collate = Collate(kind, pad_id)
        self.micro_batch_size, self.global_batch_size, self.seed = micro_batch_size, global_batch_size, seed
        self.val_examples, self.num_workers = val_examples, num_workers
        self._start_samples = 0
        self._start_step = 0

    def consumed_samples(self) -> int:
        return self._start_samples + (self.trainer.global_step - self._start_step) * self.global_batch_size

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples(), "global_batch_size": self.global_batch_size,
                "seed": self.seed, "n_train_items": len(self.train.items)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_train_items"] != len(self.train.items):
            raise ValueError(
                f"the checkpoint's data position counts {state['n_train_items']} training features, but this run's data "
                f"gives {len(self.train.items)}: the data, tokenizer or trainer.seq_len changed. Resume with the same "
                "ones, or start a new run from its weights (init_from)"
            )
        self._start_samples = int(state["consumed_samples"])

    def train_dataloader(self) -> DataLoader:
        self._start_step = self.trainer.global_step
        stream = ExampleStream(self.train.items, self.collate, micro_batch_size=self.micro_batch_size,
                               rank=self.trainer.global_rank, world_size=self.trainer.world_size, seed=self.seed,
                               start_sample=self._start_samples)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_items(self) -> list[dict]:
        """The validation subset: the items of the first val_examples examples (all when None); a
        QA example's windows stay together. The same whatever the number of ranks."""
        items = self.val.items
        if self.val_examples is None or self.val_examples >= self.val.n_examples:
            return items
        if "example" not in items[0]:
            return items[: self.val_examples]
        return [item for item in items if item["example"] < self.val_examples]

    def val_dataloader(self) -> DataLoader:
        shard = val_shard(self.val_items(), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(shard, batch_size=self.micro_batch_size, shuffle=False, collate_fn=self.collate)
