"""FSDP2 (`fully_shard`) applied to a built Transformer from outside its code.

Each block is its own FSDP unit (all-gathered just before use, freed after), then the root
takes the embeddings, final norm and head. Hybrid sharding shards inside a node and replicates
across nodes (HSDP), trading memory for less inter-node traffic.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def build_fsdp_mesh(*, device_type: str, world_size: int, devices_per_node: int, hybrid: bool) -> DeviceMesh:
    if hybrid and world_size > devices_per_node:
        return init_device_mesh(device_type, (world_size // devices_per_node, devices_per_node),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               heads: list[nn.Module] = ()) -> None:
    """heads: task heads outside the Transformer; each becomes an FSDP unit of its own, so its
    gradients are reduced across ranks like every other parameter's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 compute with fp32 master weights and fp32 gradient reduction (the recipe torchtitan uses).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters gathered after forward: the head runs again first in backward.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for head in heads:
        fully_shard(head, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def build_fsdp_strategy(*, world_size: int, timeout_s: int, async_save: bool):
    """Lightning's ModelParallelStrategy (FSDP2, distributed checkpoints), whose checkpoint write can
    run in the background (strategy.async_save)."""
    from datetime import timedelta
    from pathlib import Path

    import torch.distributed as dist
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDPStrategy(ModelParallelStrategy):
        def __init__(self) -> None:
            super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True,
                             timeout=timedelta(seconds=timeout_s))
            self.async_save = async_save
            self.pending_save = None  # the Future of the write in flight
            self._save_group = None

        def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
            if not self.async_save:
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            from torch.distributed.checkpoint import async_save

            self.wait_for_save()  # one write in flight at a time
            path = Path(self.broadcast(filepath))
            path.mkdir(parents=True, exist_ok=True)
            state = {"state_dict": checkpoint.pop("state_dict")}
            state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
            if self._save_group is None:  # the write's own collectives never interleave with training's
                self._save_group = dist.new_group(backend="gloo")
            # Copies this rank's shards to CPU memory now; writes them in a thread while training goes on.
            self.pending_save = async_save(state, checkpoint_id=path, process_group=self._save_group)
            if self.global_rank == 0:
                torch.save(checkpoint, path / _METADATA_FILENAME)

        def wait_for_save(self) -> None:
            if self.pending_save is not None:
                future, self.pending_save = self.pending_save, None
                future.result()

        def save_done(self) -> bool:
            return self.pending_save is None or self.pending_save.done()

    return FSDPStrategy()
