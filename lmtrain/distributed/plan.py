"""`lmtrain plan`: per-GPU memory of one training step for a model, strategy, batch and world size.

It counts bytes; it does not measure them. Parameters, gradients and optimizer state follow the
ZeRO paper's accounting (Rajbhandari et al. 2020, https://arxiv.org/abs/1910.02054, section 3.1)
with the dtypes each lmtrain strategy really uses (lmtrain/distributed/). Activations follow
Korthikanti et al. 2022 (https://arxiv.org/abs/2205.05198, section 4.1), recounted for this
model's `Block`: the tensors autograd saves, which tests/unit/distributed/test_plan.py checks
against autograd itself. Peak memory is the sum of every term: an upper bound when there is no
gradient accumulation, since gradients then grow only as activations are freed.

Assumes eager mode (torch.compile may save less), fused AdamW and SDPA's flash kernel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lmtrain.config import PRECISIONS, TrainerConfig
from lmtrain.distributed.config import Family, ShardingKind, StrategyConfig, StrategyKind
from lmtrain.model.config import MLPKind, ModelConfig, Norm, Positional
from lmtrain.model.transformer import Transformer

GiB = 1024**3
DEFAULT_VOCAB_SIZE = 50304  # GPT-2's 50257 rounded up to a multiple of 64, as nanoGPT pads it
FIXED_OVERHEAD_BYTES = int(1.5 * GiB)
"""CUDA context, cuBLAS and NCCL workspaces and allocator fragmentation: memory that
torch.cuda.max_memory_allocated() does not show but nvidia-smi does."""
STRATEGY_ORDER = ("single", "ddp", "deepspeed_zero1", "deepspeed_zero2", "fsdp", "deepspeed_zero3",
                  "deepspeed_zero3_offload")
"""Every strategy `estimate_memory` knows, least communication first: the first that fits is the one to use."""
MAX_PLANNED_NODES = 1024


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """micro_batch_size, seq_len, devices x num_nodes, precision and activation_checkpointing are used."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB (2^30 bytes: nvidia-smi's MiB / 1024; an H100 80GB has 79.6, an H200 140.4)."""
    vocab_size: Optional[int] = None
    """Vocabulary for a model whose model.vocab_size is null (train takes it from the prepared data); null = 50304."""
    precision: Optional[str] = None
    """null = trainer.precision, whose 'auto' means bf16-mixed here (what a GPU with bf16 gets)."""

    def __post_init__(self) -> None:
        if self.gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb={self.gpu_memory_gb} must be > 0 (GiB per GPU, e.g. 80)")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"vocab_size={self.vocab_size} must be > 0 (or null)")
        if self.vocab_size and self.model.vocab_size and self.vocab_size != self.model.vocab_size:
            raise ValueError(
                f"vocab_size={self.vocab_size} disagrees with model.vocab_size={self.model.vocab_size}; "
                "set only one of them"
            )
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)} (or null)")
        if self.trainer.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"trainer.seq_len={self.trainer.seq_len} exceeds model.max_seq_len={self.model.max_seq_len} "
                f"of model={self.model.name}; lower trainer.seq_len or raise model.max_seq_len"
            )

    def resolved_precision(self) -> str:
        precision = self.precision or self.trainer.precision
        return "bf16-mixed" if precision == "auto" else precision


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on each GPU during one training step, and in host memory per process."""

    strategy: str
    world_size: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    overhead_bytes: int
    """FIXED_OVERHEAD_BYTES plus DeepSpeed's gradient reduce buckets."""
    cpu_bytes: int = 0
    """Host memory per process: ZeRO-3 offload's parameters, gradients and optimizer state."""

    @property
    def total_bytes(self) -> int:
        states = self.params_bytes + self.grads_bytes + self.optimizer_bytes
        return states + self.activations_bytes + self.overhead_bytes

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total_bytes <= gpu_memory_gb * GiB


@dataclass(frozen=True)
class Numerics:
    """Bytes per element for one strategy at one precision."""

    param: int  # a parameter as stored (its shard, under ZeRO-3 and FSDP)
    grad: int
    optimizer: int  # AdamW's two moments, plus DeepSpeed's fp32 master weights
    working_param: int  # a parameter gathered for compute by ZeRO-3 or FSDP
    activation: int  # a saved matmul input or output
    norm_input: int  # a saved norm input: fp32 under CUDA autocast, which runs norms in fp32
    residual: int  # the residual stream, which activation checkpointing keeps per block
    autocast: bool  # norms return fp32, so each linear after one saves its own low-precision copy


def _uniform(nbytes: int, *, optimizer: int) -> Numerics:
    """Every tensor in one dtype, no autocast."""
    return Numerics(param=nbytes, grad=nbytes, optimizer=optimizer, working_param=nbytes, activation=nbytes,
                    norm_input=nbytes, residual=nbytes, autocast=False)


def compute_numerics(strategy: str, precision: str) -> Numerics:
    """The dtypes strategy (a STRATEGY_ORDER name) gives each tensor at a Lightning precision string."""
    match StrategyKind(strategy).family, precision:
        case Family.deepspeed, "bf16-mixed" | "bf16-true" | "16-mixed":
            # DeepSpeed casts the model to 16 bits and keeps fp32 master weights and both Adam moments
            # in its optimizer: 2 + 2 + 12 bytes per parameter (the ZeRO paper's K = 12). No autocast.
            return _uniform(2, optimizer=12)
        case Family.fsdp, "bf16-mixed" | "bf16-true":
            # lmtrain's FSDP2 (distributed/parallelize.py build_plan, fsdp.py): fp32 sharded weights, bf16 all-gathered
            # copies for compute, fp32 gradient reduction; Lightning runs "32-true", so no autocast.
            return Numerics(param=4, grad=4, optimizer=8, working_param=2, activation=2, norm_input=2, residual=2,
                            autocast=False)
        case Family.fsdp, _:
            return _uniform(4, optimizer=8)  # FSDP2 computes in fp32 unless the precision is bf16
        case Family.replicated, "bf16-mixed" | "16-mixed":
            # Lightning's mixed precision is autocast over fp32 weights: 4 + 4 + 8 bytes per parameter;
            # matmuls save 16-bit copies, norms run (and save their inputs) in fp32.
            return Numerics(param=4, grad=4, optimizer=8, working_param=4, activation=2, norm_input=4, residual=4,
                            autocast=True)
        case Family.replicated, "bf16-true":  # module.to(bf16); torch's AdamW keeps its moments in the parameters' dtype
            return _uniform(2, optimizer=4)
        case Family.replicated, "64-true":
            return _uniform(8, optimizer=16)
        case _, "32-true":
            return _uniform(4, optimizer=8)
    raise ValueError(f"precision={precision!r} is not supported by strategy={strategy}: use bf16-mixed, 16-mixed, "
                     "bf16-true or 32-true")


@dataclass(frozen=True)
class ParameterCounts:
    num_parameters: int
    """As Transformer.num_parameters(): tied weights once, without the vocab's padding rows."""
    stored: int
    """Elements allocated, padding rows included: what memory holds."""
    largest_block: int
    outside_blocks: int
    """Embeddings, final norm and head: FSDP's root unit."""
    largest_module: int
    """The most parameters one module holds directly: what ZeRO-3 gathers at once."""


def count_parameters(model_cfg: ModelConfig) -> ParameterCounts:
    """Counted on a model built on the meta device: real shapes, no memory, no second description of the layout."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    stored = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    return ParameterCounts(
        num_parameters=model.num_parameters(), stored=stored, largest_block=max(blocks),
        outside_blocks=stored - sum(blocks),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
    )


@dataclass(frozen=True)
class ActivationTerms:
    """Activation bytes of one micro batch."""

    block: int  # saved by one Block's forward
    block_input: int  # one block's input: all that activation checkpointing keeps of a block
    head: int  # saved by the final norm, the lm head and the loss (its fp32 log-probs)
    loss_backward: int  # held besides, while the loss backpropagates

    def peak(self, n_layers: int, activation_checkpointing: bool) -> int:
        if not activation_checkpointing:
            return n_layers * self.block + self.head + self.loss_backward
        # Backward rebuilds one block at a time, after the loss's own peak has passed.
        return n_layers * self.block_input + max(self.head + self.loss_backward, self.block)


def compute_activation_terms(cfg: ModelConfig, num: Numerics, *, tokens: int) -> ActivationTerms:
    """tokens = micro_batch_size x seq_len. Korthikanti et al.'s 34 s.b.h bytes per layer without the
    s^2 attention-score terms (SDPA's flash kernel saves only its output and a logsumexp), for
    rotary q/k, grouped k/v heads and the MLP's hidden width."""
    h, kv, f = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim
    a = num.activation
    norm = num.norm_input * h + _norm_stats_bytes(cfg.norm)
    attention = (
        norm
        + a * h  # qkv's input
        + a * (h + 2 * kv)  # qkv's output: the k/v views SDPA saves keep all of it alive
        + (a * (h + kv) if cfg.positional is Positional.rope else 0)  # rotated q and k
        + a * h  # SDPA's output, which out_proj saves as its input
        + 4 * cfg.n_heads  # SDPA's fp32 logsumexp
    )
    linear_copies = 2 if cfg.mlp is MLPKind.swiglu and num.autocast else 1  # autocast casts x once per linear
    mlp = norm + a * h * linear_copies + a * f * _mlp_hidden_tensors(cfg.mlp)
    dropout_masks = 2 * h if cfg.dropout > 0 else 0  # one byte per element after attention and after the MLP
    logits = tokens * cfg.padded_vocab_size
    head = (norm if cfg.pre_norm else 0) + a * h  # final norm, lm head's input
    return ActivationTerms(
        block=tokens * (attention + mlp + dropout_masks),
        block_input=tokens * num.residual * h,
        head=tokens * head + 4 * logits,  # the loss is computed on .float() logits; log_softmax saves its output
        loss_backward=8 * logits,  # fp32 gradients of the log-probs and of the logits
    )


def _norm_stats_bytes(norm: Norm) -> int:
    match norm:
        case Norm.rmsnorm:
            return 4  # fp32 rstd per token
        case Norm.layernorm:
            return 8  # fp32 mean and rstd per token
    raise ValueError(f"model.norm={norm} has no memory estimate")


def _mlp_hidden_tensors(mlp: MLPKind) -> int:
    match mlp:
        case MLPKind.swiglu:
            return 4  # gate's output (silu's input), silu's and up's outputs (the product's), the product (down's)
        case MLPKind.gelu:
            return 2  # gelu's input and output
        case MLPKind.relu:
            return 1  # relu's output, which down saves too
    raise ValueError(f"model.mlp={mlp} has no memory estimate")


@dataclass(frozen=True)
class _States:
    params: int
    grads: int
    optimizer: int
    buffers: int = 0
    cpu: int = 0


def _state_bytes(strategy: str, counts: ParameterCounts, num: Numerics, settings: StrategyConfig,
                 shards: int) -> _States:
    n = counts.stored

    def shard(bytes_per_element: int) -> int:
        return -(-n * bytes_per_element // shards)  # ceil: DeepSpeed and FSDP pad the last rank's partition

    # ZeRO-3 gathers a module's parameters as it runs and prefetches prefetch_bucket_size elements ahead.
    zero3_gathered = min(n, counts.largest_module + settings.prefetch_bucket_size) * num.working_param
    reduce_bucket = settings.reduce_bucket_size * num.grad
    match strategy:
        case "single":
            return _States(num.param * n, num.grad * n, num.optimizer * n)
        case "ddp":
            # DDP's reducer copies every gradient into its all-reduce buckets: lmtrain's DDPStrategy keeps
            # gradient_as_bucket_view=False, torch's default.
            return _States(num.param * n, 2 * num.grad * n, num.optimizer * n)
        case "deepspeed_zero1":  # two reduce buckets: overlap_comm double-buffers them
            return _States(num.param * n, num.grad * n, shard(num.optimizer), buffers=2 * reduce_bucket)
        case "deepspeed_zero2":
            return _States(num.param * n, shard(num.grad), shard(num.optimizer), buffers=2 * reduce_bucket)
        case "deepspeed_zero3":
            return _States(shard(num.param) + zero3_gathered, shard(num.grad), shard(num.optimizer),
                           buffers=reduce_bucket)
        case "deepspeed_zero3_offload":
            # The GPU holds only the modules in flight; the host holds the 16-bit parameter partition,
            # the gradient partition, its fp32 copy for the optimizer, the fp32 master weights and moments.
            host = shard(num.param) + shard(num.grad) + shard(4) + shard(num.optimizer)
            return _States(zero3_gathered, 0, 0, buffers=reduce_bucket, cpu=host)
        case "fsdp":
            # The root unit (embeddings, head) stays gathered from forward through backward; blocks are
            # gathered one ahead of use, or kept gathered after forward if reshard_after_forward=false.
            blocks = 2 * counts.largest_block if settings.reshard_after_forward else n - counts.outside_blocks
            gathered = min(n, counts.outside_blocks + blocks) * num.working_param
            unsharded_grads = counts.largest_block * (num.working_param + 4)  # a block's grads, cast to fp32 to reduce
            return _States(shard(num.param) + gathered, shard(num.grad) + unsharded_grads, shard(num.optimizer))
    raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGY_ORDER)}")


def estimate_memory(
    model_cfg: ModelConfig,
    strategy_name: str,
    *,
    micro_batch_size: int,
    seq_len: int,
    world_size: int,
    precision: str,
    activation_checkpointing: bool,
    strategy_cfg: Optional[StrategyConfig] = None,
    devices_per_node: Optional[int] = None,
    counts: Optional[ParameterCounts] = None,
) -> MemoryEstimate:
    """Peak bytes per GPU for strategy_name (one of STRATEGY_ORDER; 'auto' is resolved by the caller).

    strategy_cfg: bucket sizes and FSDP settings (None = StrategyConfig's defaults).
    devices_per_node: the FSDP shard group under strategy.sharding=hybrid (None = world_size).
    counts: count_parameters(model_cfg), to skip rebuilding the meta model on repeated calls.
    """
    if strategy_name not in STRATEGY_ORDER:
        raise ValueError(f"unknown strategy {strategy_name!r}: choose one of {', '.join(STRATEGY_ORDER)}")
    if model_cfg.vocab_size is None:
        raise ValueError("model.vocab_size is null: set it (or the plan's vocab_size) to estimate the embeddings")
    for name, value in (("micro_batch_size", micro_batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be > 0")
    settings = strategy_cfg or StrategyConfig()
    shards = world_size
    if strategy_name == "fsdp" and settings.sharding is ShardingKind.hybrid and devices_per_node:
        shards = min(world_size, devices_per_node)  # as build_fsdp_mesh: shard within a node
    num = compute_numerics(strategy_name, precision)
    states = _state_bytes(strategy_name, counts or count_parameters(model_cfg), num, settings, shards)
    terms = compute_activation_terms(model_cfg, num, tokens=micro_batch_size * seq_len)
    return MemoryEstimate(
        strategy=strategy_name, world_size=world_size, params_bytes=states.params, grads_bytes=states.grads,
        optimizer_bytes=states.optimizer, activations_bytes=terms.peak(model_cfg.n_layers, activation_checkpointing),
        overhead_bytes=FIXED_OVERHEAD_BYTES + states.buffers, cpu_bytes=states.cpu,
    )


def choose_cheapest(estimates: list[MemoryEstimate], gpu_memory_gb: float) -> Optional[MemoryEstimate]:
    """The first estimate in STRATEGY_ORDER that fits, or None: less sharding means less communication."""
    fitting = [e for e in estimates if e.fits(gpu_memory_gb)]
    return min(fitting, key=lambda e: STRATEGY_ORDER.index(e.strategy), default=None)


def resolve_strategy_name(kind_name: str, world_size: int) -> str:
    """strategy.kind's name with 'auto' resolved as build_strategy does; 'single' needs one process."""
    if kind_name == "auto":
        return "ddp" if world_size > 1 else "single"
    if kind_name == "single" and world_size > 1:
        raise ValueError(f"strategy=single runs one process, but trainer.devices x trainer.num_nodes = {world_size}; "
                         "use strategy=ddp (or auto)")
    if kind_name not in STRATEGY_ORDER:
        raise ValueError(f"strategy={kind_name} has no memory estimate: choose one of {', '.join(STRATEGY_ORDER)}")
    return kind_name


def run(cfg: PlanConfig) -> list[MemoryEstimate]:
    """Print the estimate of every strategy for cfg, mark the requested one, name the cheapest that fits."""
    tcfg = cfg.trainer
    model_cfg = cfg.model if cfg.model.vocab_size else cfg.model.with_vocab(cfg.vocab_size or DEFAULT_VOCAB_SIZE)
    requested = resolve_strategy_name(cfg.strategy.kind.name, tcfg.world_size)
    precision = cfg.resolved_precision()
    counts = count_parameters(model_cfg)
    estimate = functools.partial(
        estimate_memory, model_cfg, micro_batch_size=tcfg.micro_batch_size, seq_len=tcfg.seq_len,
        world_size=tcfg.world_size, precision=precision, activation_checkpointing=tcfg.activation_checkpointing,
        strategy_cfg=cfg.strategy, devices_per_node=tcfg.devices, counts=counts,
    )
    compute_numerics(requested, precision)  # a precision the requested strategy cannot run fails here
    names = [n for n in _table_strategies(requested, tcfg.world_size) if _supports(n, precision)]
    estimates = [estimate(name) for name in names]
    print(_header(cfg, model_cfg, counts, precision), flush=True)
    print(_table(estimates, requested, cfg.gpu_memory_gb, tcfg.devices), flush=True)
    cheapest = choose_cheapest(estimates, cfg.gpu_memory_gb)
    lines = [_verdict(estimates, requested, cheapest, cfg.gpu_memory_gb)]
    if cheapest is None:
        lines += _advice(cfg, names, estimate)
    print("\n".join(lines), flush=True)
    return estimates


def _table_strategies(requested: str, world_size: int) -> list[str]:
    unsharded = requested if requested in ("single", "ddp") else ("single" if world_size == 1 else "ddp")
    return [unsharded] + [name for name in STRATEGY_ORDER if name not in ("single", "ddp")]


def _supports(strategy: str, precision: str) -> bool:
    try:
        compute_numerics(strategy, precision)
    except ValueError:
        return False
    return True


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GiB:.2f}"


def _header(cfg: PlanConfig, model_cfg: ModelConfig, counts: ParameterCounts, precision: str) -> str:
    t = cfg.trainer
    lines = [
        f"model {model_cfg.name}: {counts.num_parameters:,} parameters ({counts.stored:,} stored, with the vocab "
        f"padded to {model_cfg.padded_vocab_size})",
        f"world size {t.world_size} (trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes}); per GPU "
        f"micro batch {t.micro_batch_size} x seq_len {t.seq_len}; precision {precision}; activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}",
    ]
    if cfg.model.vocab_size is None:
        source = "vocab_size" if cfg.vocab_size else f"the default {DEFAULT_VOCAB_SIZE}; set vocab_size=... for yours"
        lines.append(f"model.vocab_size is null: planned with {model_cfg.vocab_size} ({source})")
    if t.compile:
        lines.append("trainer.compile=true: activations are counted for eager mode; compiled blocks often save less")
    lines.append(f"overhead: {FIXED_OVERHEAD_BYTES / GiB:.1f} GiB for the CUDA context and allocator fragmentation, "
                 "plus DeepSpeed's gradient reduce buckets")
    return "\n".join(lines) + "\n"


def _table(estimates: list[MemoryEstimate], requested: str, gpu_memory_gb: float, devices_per_node: int) -> str:
    width = max(len("GiB per GPU"), *(len(e.strategy) + 2 for e in estimates))
    head = f"{'GiB per GPU':<{width}} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'overh':>7} {'total':>7}"
    rows = [f"{head}  fits {gpu_memory_gb:g} GiB"]
    for e in estimates:
        mark = "*" if e.strategy == requested else " "
        cells = (e.params_bytes, e.grads_bytes, e.optimizer_bytes, e.activations_bytes, e.overhead_bytes, e.total_bytes)
        row = f"{mark} {e.strategy:<{width - 2}} " + " ".join(f"{_gib(c):>7}" for c in cells)
        row += f"  {'yes' if e.fits(gpu_memory_gb) else 'no'}"
        if e.cpu_bytes:
            row += f"   + host {_gib(e.cpu_bytes)} GiB per process, {_gib(e.cpu_bytes * devices_per_node)} per node"
        rows.append(row)
    return "\n".join(rows) + f"\n* requested (strategy={requested})"


def _verdict(estimates: list[MemoryEstimate], requested: str, cheapest: Optional[MemoryEstimate],
             gpu_memory_gb: float) -> str:
    mine = next(e for e in estimates if e.strategy == requested)
    fits = "fits" if mine.fits(gpu_memory_gb) else "does not fit"
    line = f"\nstrategy={requested} {fits}: {_gib(mine.total_bytes)} of {gpu_memory_gb:g} GiB per GPU"
    if cheapest is None:
        return line + "\nno strategy fits."
    return line + f"\ncheapest strategy that fits: strategy={cheapest.strategy} ({_gib(cheapest.total_bytes)} GiB)"


def _advice(cfg: PlanConfig, names: list[str], estimate: Callable[..., MemoryEstimate]) -> list[str]:
    """What would make something fit: activation checkpointing, a smaller micro batch, more nodes."""
    t, gpu = cfg.trainer, cfg.gpu_memory_gb

    def cheapest_line(setting: str, **changes) -> Optional[str]:
        best = choose_cheapest([estimate(name, **changes) for name in names], gpu)
        return None if best is None else f"  {setting}: strategy={best.strategy} fits ({_gib(best.total_bytes)} GiB)"

    lines = ["what would fit:"]
    if not t.activation_checkpointing:
        setting = "trainer.activation_checkpointing=true"
        lines.append(cheapest_line(setting, activation_checkpointing=True) or f"  {setting}: not enough alone")
    # Divisors of the micro batch keep the global batch (more accumulation steps instead).
    smaller = (m for m in range(t.micro_batch_size - 1, 0, -1) if t.micro_batch_size % m == 0)
    found = (cheapest_line(f"trainer.micro_batch_size={m}", micro_batch_size=m) for m in smaller)
    lines.append(next(filter(None, found), "  a smaller micro batch: not enough alone"))
    sharded = "deepspeed_zero3" if "deepspeed_zero3" in names else "fsdp"
    nodes = t.num_nodes * 2
    while nodes <= MAX_PLANNED_NODES and not estimate(sharded, world_size=t.devices * nodes).fits(gpu):
        nodes *= 2
    lines.append(f"  trainer.num_nodes={nodes} ({t.devices * nodes} GPUs): strategy={sharded} fits"
                 if nodes <= MAX_PLANNED_NODES else
                 "  more GPUs: not enough alone (activations do not shard: lower the micro batch or seq_len)")
    return lines
