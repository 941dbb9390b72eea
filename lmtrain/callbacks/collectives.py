"""`LMTRAIN_COUNT_COLLECTIVES=<dir>`: count the torch.distributed collectives of every optimizer step,
per rank, into <dir>/collectives-rank<R>.jsonl ({"step": s, "<collective>": n, ...} a line).

A debugging aid for "what does one step cost in communication": it wraps the Python-level functions
of `torch.distributed` that Lightning, FSDP2 and lmtrain call (all_reduce, broadcast,
reduce_scatter_single, all_gather_single, ...); one started with async_op=True (nobody waits for it
there) counts as "<name>_async". Collectives issued from C++ (DDP's gradient buckets,
DeepSpeed's own communication layer) do not pass through them and are not counted.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import lightning as L
import torch.distributed as dist

ENV = "LMTRAIN_COUNT_COLLECTIVES"
COLLECTIVES = ("all_reduce", "broadcast", "reduce", "barrier", "all_gather", "all_gather_into_tensor",
               "all_gather_single", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
               "all_to_all_single", "all_gather_object", "broadcast_object_list",
               "_broadcast_coalesced")  # DDP's buffer (and initial parameter) broadcast


class CollectiveCounter(L.Callback):
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.counts: Counter[str] = Counter()
        self.rows: list[dict] = []
        self._originals: dict[str, object] = {}
        self._step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None or name in self._originals:
                continue
            self._originals[name] = original
            setattr(dist, name, self._counted(name, original))

    def _counted(self, name: str, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            self.counts[name + ("_async" if kwargs.get("async_op") else "")] += 1
            return original(*args, **kwargs)

        return counted

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self.counts.clear()  # setup's collectives (mesh, broadcasts of the config) are not a step's

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self._step:  # an optimizer step ended with this micro batch
            self._step = trainer.global_step
            self.rows.append({"step": self._step, **dict(sorted(self.counts.items()))})
            self.counts.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"collectives-rank{trainer.global_rank}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))


def collective_counter() -> list[CollectiveCounter]:
    """[the counter] when LMTRAIN_COUNT_COLLECTIVES names a directory, else []."""
    directory = os.environ.get(ENV)
    return [CollectiveCounter(Path(directory))] if directory else []
