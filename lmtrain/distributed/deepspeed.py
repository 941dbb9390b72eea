"""DeepSpeed ZeRO through Lightning, on GPUs and on CPUs.

The DeepSpeed config is generated from lmtrain's own settings (micro batch, accumulation,
clipping, stage, buckets, offload) so the two cannot disagree; a user JSON may add or override
keys, but not contradict the ones lmtrain owns.

Lightning's DeepSpeedStrategy refuses a CPU accelerator. DeepSpeed itself runs ZeRO 1-3 on CPU
over gloo (DS_ACCELERATOR=cpu); the subclass below lifts Lightning's CUDA-only checks, which makes
every strategy testable without a GPU and usable on CPU clusters.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from lmtrain.distributed.config import StrategyConfig, StrategyKind

# Keys whose value lmtrain derives from its own config; a user JSON must not contradict them.
OWNED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_clipping")
# Keys lmtrain (through Lightning) sets from trainer.global_batch_size and trainer.precision: never in the JSON.
REFUSED_KEYS = {"gradient_accumulation_steps": "trainer.global_batch_size", "train_batch_size": "trainer.global_batch_size",
                "bf16": "trainer.precision", "fp16": "trainer.precision"}


def build_deepspeed_config(cfg: StrategyConfig, *, micro_batch_size: int, grad_clip: float, on_cpu: bool,
                           load_universal: bool = False) -> dict:
    """load_universal: the run resumes a checkpoint written by another number of ranks, converted to
    DeepSpeed's universal checkpoint (lmtrain.checkpoint.universal); only then, since the engine then
    loads nothing but `<ckpt>/latest_universal`."""
    stage = cfg.zero_stage
    zero: dict = {"stage": stage, "contiguous_gradients": True, "overlap_comm": not on_cpu,
                  "reduce_bucket_size": cfg.reduce_bucket_size}
    if stage in (1, 2):
        zero["allgather_bucket_size"] = cfg.allgather_bucket_size
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = cfg.prefetch_bucket_size
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # checkpoints stay sharded; `lmtrain export` consolidates
    if cfg.kind is StrategyKind.deepspeed_zero3_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_clipping": grad_clip,
        "zero_allow_untested_optimizer": True,  # lmtrain's AdamW with its own parameter groups
        # With offload, DeepSpeed insists on its CPU Adam (a JIT-compiled op); torch's AdamW runs
        # on the offloaded fp32 state too, needs no compiler, and keeps the optimizer identical.
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        config = merge_user_config(config, Path(cfg.deepspeed_config))
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    return config


def merge_user_config(config: dict, path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"strategy.deepspeed_config='{path}' does not exist")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"strategy.deepspeed_config='{path}' is not valid JSON: {e}") from e
    for key, setting in REFUSED_KEYS.items():
        if key in user:
            raise ValueError(f"{path} sets {key}; lmtrain derives it from {setting}: remove it from the JSON")
    for key in OWNED_KEYS:
        if key in user and key in config and user[key] != config[key]:
            raise ValueError(
                f"{path} sets {key}={user[key]} but lmtrain's config gives {config[key]}; set it through lmtrain "
                "(trainer.micro_batch_size, trainer.global_batch_size, trainer.grad_clip) and remove it from the JSON"
            )
    merged = dict(config)
    for key, value in user.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class CPUCapableDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeedStrategy that also accepts Lightning's CPU accelerator, scales accumulated gradients
    once, not twice, and repairs DeepSpeed's ZeRO-3 universal-checkpoint load."""

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # the parent's CUDA check is the only thing skipped

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def backward(self, closure_loss: torch.Tensor, optimizer, *args, **kwargs) -> torch.Tensor:
        # Lightning has already divided the loss by the accumulation steps; DeepSpeed's engine would
        # divide it again (scale_wrt_gas), leaving gradients 1/accumulation^2 of the true mean and
        # the clipping threshold effectively multiplied by the accumulation.
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        client_state = super().load_checkpoint(checkpoint_path, weights_only)
        engine = self.deepspeed_engine
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING  # optimizer state loaded
        if fitting and engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3:
            repair_zero3_universal_load(engine.optimizer.optimizer, Path(checkpoint_path))
        return client_state

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu():
            return torch.device("cpu", self.local_rank)  # DeepSpeed reads the index as its device rank
        return super().root_device


def repair_zero3_universal_load(optimizer: torch.optim.Optimizer, checkpoint_path: Path) -> None:
    """Undo two faults of DeepSpeed's ZeRO-3 universal load (0.19: stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) in the wrapped torch optimizer:

    - it copies param_groups[0]'s settings into every group, so the no-decay group (norms, biases)
      gets the decay group's weight_decay: each group gets its own settings back from the
      converted checkpoint's zero/optimizer_state.pt (rank 0's optimizer state, every group's);
    - it gives every group's state one shared `step` tensor, which torch's Adam(W) increments in
      place once per group: with 2 groups the bias correction advanced 2 steps per step. Each
      state gets its own copy."""
    tag = (checkpoint_path / "latest_universal").read_text().strip()
    # It also holds rank 0's partition of the optimizer state: mapped, not read, as only the groups are used.
    saved = torch.load(checkpoint_path / tag / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False,
                       mmap=True)
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(f"the universal checkpoint {checkpoint_path / tag} has {len(groups)} optimizer parameter "
                           f"groups but this run's optimizer has {len(optimizer.param_groups)}")
    for group, settings in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in settings.items() if k != "params"})  # params: DeepSpeed's own, per sub-group
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def build_deepspeed_strategy(cfg: StrategyConfig, *, micro_batch_size: int, grad_clip: float, on_cpu: bool,
                             load_universal: bool = False):
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config = build_deepspeed_config(cfg, micro_batch_size=micro_batch_size, grad_clip=grad_clip, on_cpu=on_cpu,
                                    load_universal=load_universal)
    return CPUCapableDeepSpeedStrategy(config=config, timeout=timedelta(seconds=cfg.timeout_s),
                                       process_group_backend="gloo" if on_cpu else None)


@torch.no_grad()
def init_zero3_partitions(model, seed: int) -> None:
    """Transformer.init_weights for a model built under deepspeed.zero.Init: each rank fills only its
    partition (DeepSpeed's layout: the flattened tensor cut into equal slices by rank) from the
    parameter's full value, drawn one parameter at a time, so the weights equal an unsharded build's."""
    import torch.distributed as dist

    from lmtrain.model.transformer import init_value

    rules = model.init_rules()
    for name, param in model.named_parameters():
        full = init_value(rules[name], param.ds_shape, seed, name).reshape(-1)
        partition = param.ds_tensor
        size = partition.ds_numel
        start = size * dist.get_rank(group=param.ds_process_group)
        count = max(0, min(size, full.numel() - start))
        if count:
            partition.narrow(0, 0, count).copy_(full.narrow(0, start, count))
