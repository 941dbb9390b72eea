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
