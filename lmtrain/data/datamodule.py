"""The causal-LM DataModule: train windows in a resumable global order, a fixed val subset.

Its state is the number of global samples consumed, derived from the optimizer step rather
than from the loader, because loaders (and their workers) read ahead of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lmtrain.data.examples import Collate, Features
from lmtrain.data.mixture import MixtureSampler
from lmtrain.data.sampler import ExampleStream, TrainWindowStream, ValSubset, WindowSampler, count_windows, val_shard
from lmtrain.data.shards import TokenSpace
from lmtrain.tasks.config import TaskKind


@dataclass
class LMSource:
    """One prepared dataset the LM data module reads (a mixture has several)."""

    name: str
    directory: Path
    train: TokenSpace
    val: TokenSpace
    weight: float = 1.0
    max_tokens: int | None = None
    max_epochs: float | None = None

    def train_windows(self, seq_len: int) -> int:
        n_tokens = len(self.train) if self.max_tokens is None else min(len(self.train), self.max_tokens)
        return count_windows(n_tokens, seq_len)


class LMDataModule(L.LightningDataModule):
    """Packed windows of one prepared dataset, or of a weighted mixture of several (`MixtureSampler`)."""

    def __init__(
        self,
        sources: list[LMSource],
        *,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        val_batches: int,
        num_workers: int = 0,
        mixture: bool = False,
    ) -> None:
        super().__init__()
        self.sources, self.mixture = sources, mixture or len(sources) > 1
        self.seq_len, self.micro_batch_size, self.global_batch_size = seq_len, micro_batch_size, global_batch_size
        self.seed, self.val_batches, self.num_workers = seed, val_batches, num_workers
        self._start_samples = 0  # global samples consumed when this fit started (from a checkpoint)
        self._start_step = 0
        for source in sources:
            check_split_sizes(source.train_windows(seq_len), len(source.val), seq_len, source.directory)

    def sampler(self):
        if not self.mixture:
            source = self.sources[0]
            return WindowSampler(source.train, self.seq_len, self.seed)
        return MixtureSampler([s.train for s in self.sources], [s.train_windows(self.seq_len) for s in self.sources],
                              [s.weight for s in self.sources], [s.name for s in self.sources],
                              seq_len=self.seq_len, seed=self.seed)

    def val_weights(self) -> dict[str, float]:
        """Each source's share of val/loss: the mixture weights, normalized ({} for one dataset)."""
        if not self.mixture:
            return {}
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    # -- position ----------------------------------------------------------------------------
    def consumed_samples(self) -> int:
        return self._start_samples + (self.trainer.global_step - self._start_step) * self.global_batch_size

    def layout(self) -> dict:
        """What decides which window a global sample is: must match on resume."""
        if not self.mixture:
            return {"n_train_windows": self.sources[0].train_windows(self.seq_len)}
        return {"mixture": [{"name": s.name, "weight": s.weight, "n_train_windows": s.train_windows(self.seq_len)}
                            for s in self.sources]}

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples(), "global_batch_size": self.global_batch_size,
                "seed": self.seed, "seq_len": self.seq_len, **self.layout()}

    def load_state_dict(self, state: dict) -> None:
        saved = {key: state.get(key) for key in ("seq_len", *self.layout())}
        if saved != {"seq_len": self.seq_len, **self.layout()}:
            raise ValueError(
                f"the checkpoint's data position was taken over {describe_layout(saved)}, but this run reads "
                f"{describe_layout({'seq_len': self.seq_len, **self.layout()})}; resume with the same data "
                "(data.sources and their weights) and trainer.seq_len, or start a new run (init_from its weights) to "
                "change them"
            )
        self._start_samples = int(state["consumed_samples"])

    # -- loaders ---------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self._start_step = self.trainer.global_step  # restored by now on resume
        stream = TrainWindowStream(self.sampler(), micro_batch_size=self.micro_batch_size,
                                   rank=self.trainer.global_rank, world_size=self.trainer.world_size,
                                   start_sample=self._start_samples)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def val_window_counts(self) -> list[int]:
        """Windows of each source in the validation subset: the first val_batches x global_batch_size
        of its val split (fewer if it holds fewer), whatever the number of ranks and micro batch size."""
        return [min(count_windows(len(s.val), self.seq_len), self.val_batches * self.global_batch_size)
                for s in self.sources]

    def val_dataloader(self) -> DataLoader:
        val = ValSubset([s.val for s in self.sources], self.val_window_counts(), seq_len=self.seq_len,
                        rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return DataLoader(val, batch_size=self.micro_batch_size, shuffle=False, num_workers=0)


def describe_layout(layout: dict) -> str:
    if "mixture" in layout and layout["mixture"]:
        parts = ", ".join(f"{m['name']} (weight {m['weight']}, {m['n_train_windows']} windows)" for m in layout["mixture"])
        return f"the mixture {parts} with seq_len={layout['seq_len']}"
    return f"{layout.get('n_train_windows')} windows of seq_len={layout['seq_len']}"


def check_split_sizes(n_train_windows: int, n_val_tokens: int, seq_len: int, prepared_dir: Path) -> None:
    if n_train_windows == 0:
        raise ValueError(
            f"the train split of {prepared_dir} holds fewer than trainer.seq_len+1 = {seq_len + 1} tokens (or "
            f"max_tokens leaves fewer): nothing to train on. Use more data (data.paths) or a smaller trainer.seq_len"
        )
    if count_windows(n_val_tokens, seq_len) == 0:
        raise ValueError(
            f"the val split of {prepared_dir} holds {n_val_tokens} tokens, fewer than trainer.seq_len+1 = {seq_len + 1}: "
            "nothing to validate on. Use more data (data.val_fraction) or a smaller trainer.seq_len"
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
