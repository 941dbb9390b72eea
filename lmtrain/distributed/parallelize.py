"""How a run's model is parallelized: one plan, built once, and the one function that applies it.

`build_plan` turns the strategy and trainer configs into a `ParallelPlan`: the strategy kind, the
precision Lightning runs, FSDP2's parameter dtype, activation checkpointing, compile and sharding.
train.py, the task and the checkpoint callback read the plan rather than the configs; what a
strategy is (family, checkpoint layout, who clips) is asked of its `StrategyKind`, which `lmtrain
plan` uses too. `parallelize` applies it to a built model in a fixed order (torchtitan's):

  activation checkpointing -> compile -> sharding (FSDP2; DeepSpeed shards inside its engine)
  -> under meta init, each rank's shards allocated and initialised

With meta init (FSDP2 and ZeRO-3, strategy.meta_init) the model is built on the meta device
(`build_transformer`) and no rank ever holds the whole fp32 model: after sharding, each parameter's
full value is drawn from its own generator (Transformer.init_weights) and the rank keeps its slice,
so the weights equal an unsharded build's bit for bit, whatever the world size.

Checkpointing and compile wrap each Transformer block's forward in place, so state-dict keys stay
those of the plain model (no `_orig_mod.` or `_checkpoint_wrapped_module.` prefixes) and checkpoints
stay interchangeable between plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmtrain.config import TrainerConfig
from lmtrain.model import ModelConfig, Transformer, build_model
from lmtrain.distributed.config import Family, ShardingKind, StrategyConfig, StrategyKind

FSDP_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


@dataclass(frozen=True)
class ParallelPlan:
    kind: StrategyKind
    """Resolved: never auto."""
    precision: str
    """The precision plugin Lightning runs ("32-true" under FSDP2, whose policy carries the bf16)."""
    param_dtype: torch.dtype | None = None
    """FSDP2: the dtype parameters are all-gathered and computed in (None: fp32)."""
    activation_checkpointing: bool = False
    compile: bool = False
    sharding: ShardingKind = ShardingKind.full
    reshard_after_forward: bool = True
    devices_per_node: int = 1
    device_type: str = "cpu"
    meta_init: bool = False
    """Build the model on the meta device; initialise each rank's shards only (FSDP2, ZeRO-3)."""

    @property
    def family(self) -> Family:
        return self.kind.family

    @property
    def engine_clips(self) -> bool:
        return self.kind.engine_clips

    @property
    def checkpoint_layout(self):
        return self.kind.checkpoint_layout


def resolve_kind(cfg: StrategyConfig, world_size: int) -> StrategyKind:
    if cfg.kind is StrategyKind.auto:
        return StrategyKind.ddp if world_size > 1 else StrategyKind.single
    return cfg.kind


def on_cpu(tcfg: TrainerConfig) -> bool:
    return tcfg.accelerator == "cpu" or (tcfg.accelerator == "auto" and not torch.cuda.is_available())


def resolve_precision(tcfg: TrainerConfig) -> str:
    """trainer.precision; auto = bf16-mixed on a GPU with bf16, 32-true elsewhere."""
    if tcfg.precision != "auto":
        return tcfg.precision
    return "bf16-mixed" if not on_cpu(tcfg) and torch.cuda.is_bf16_supported() else "32-true"


def build_plan(scfg: StrategyConfig, tcfg: TrainerConfig) -> ParallelPlan:
    kind = resolve_kind(scfg, tcfg.world_size)
    precision, param_dtype = resolve_precision(tcfg), None
    if kind is StrategyKind.fsdp:
        if precision not in FSDP_PRECISIONS:
            raise ValueError(f"strategy=fsdp supports trainer.precision {', '.join(FSDP_PRECISIONS)}, not {precision}")
        # FSDP2 does mixed precision itself (bf16 all-gathers and compute, fp32 master weights and
        # reductions), so Lightning runs 32-true and the policy carries the bf16.
        param_dtype = torch.bfloat16 if precision.startswith("bf16") else None
        precision = "32-true"
    return ParallelPlan(
        kind=kind, precision=precision, param_dtype=param_dtype, activation_checkpointing=tcfg.activation_checkpointing,
        compile=tcfg.compile, sharding=scfg.sharding, reshard_after_forward=scfg.reshard_after_forward,
        devices_per_node=tcfg.devices, device_type="cpu" if on_cpu(tcfg) else "cuda",
        meta_init=scfg.meta_init and kind.shards_parameters,
    )


def build_transformer(cfg: ModelConfig, plan: ParallelPlan, *, seed: int) -> Transformer:
    """The plan's model: built and initialised now, or (meta init) shapes only on the meta device,
    initialised by `parallelize` after sharding, to the same values."""
    if plan.meta_init:
        with torch.device("meta"):
            return Transformer(cfg)
    return build_model(cfg, seed=seed)


def parallelize(model: Transformer, plan: ParallelPlan, *, world_size: int, device: torch.device, init_seed: int,
                heads: list[nn.Module] = ()) -> Transformer:
    """Apply the plan to a model from `build_transformer` (and a task's heads) once processes exist,
    and return it: the same model, changed in place, but under ZeRO-3 meta init a new one.

    Meta init: FSDP2 allocates each rank's shards on `device` after sharding; ZeRO-3 builds the model
    again inside deepspeed.zero.Init (Lightning runs configure_model in it), which partitions each
    module's parameters as it is built. Either way the shards are then initialised with the model's
    own init (Lightning would call each module's reset_parameters)."""
    if plan.meta_init and plan.family is Family.deepspeed:
        from lmtrain.distributed.deepspeed import init_zero3_partitions

        with torch.random.fork_rng(devices=[]):  # the modules' default inits, partitioned and overwritten
            model = Transformer(model.cfg)
        init_zero3_partitions(model, init_seed)
    if plan.activation_checkpointing:
        apply_activation_checkpointing(model)
    if plan.compile:
        apply_compile(model)
    if plan.kind is StrategyKind.fsdp:
        from lmtrain.distributed.fsdp import apply_fsdp, build_fsdp_mesh

        mesh = build_fsdp_mesh(device_type=plan.device_type, world_size=world_size, devices_per_node=plan.devices_per_node,
                               hybrid=plan.sharding is ShardingKind.hybrid)
        apply_fsdp(model, mesh, param_dtype=plan.param_dtype, reshard_after_forward=plan.reshard_after_forward,
                   heads=heads)
    if plan.meta_init and plan.kind is StrategyKind.fsdp:
        model.to_empty(device=device)
        model.init_weights(init_seed)
    return model


def apply_activation_checkpointing(model: nn.Module) -> None:
    for block in model.blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def apply_compile(model: nn.Module) -> None:
    # Per block (as torchtitan does): blocks share one compiled graph, compile time stays flat in depth.
    for block in model.blocks:
        block.compile()
