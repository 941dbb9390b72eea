"""`lmtrain plan`'s memory estimates: sharding arithmetic, activation counts checked against autograd,
the cheapest-fitting choice, bad input, the real conf/plan.yaml, and (on a GPU) the measured peak."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lmtrain.distributed.plan import (
    FIXED_OVERHEAD_BYTES,
    GiB,
    STRATEGY_ORDER,
    MemoryEstimate,
    PlanConfig,
    choose_cheapest,
    compute_activation_terms,
    compute_numerics,
    count_parameters,
    estimate_memory,
    run,
)
from lmtrain.model import ModelConfig, build_model

PRESET_DIR = Path(__file__).resolve().parents[3] / "conf" / "model"
SHARDED = ("deepspeed_zero1", "deepspeed_zero2", "fsdp", "deepspeed_zero3")


def load_preset(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()))


@pytest.fixture(scope="module")
def llama_1b() -> tuple[ModelConfig, object]:
    cfg = load_preset("llama_1b")
    return cfg, count_parameters(cfg)


def estimate(model, strategy: str, *, world_size: int = 8, micro_batch_size: int = 4, seq_len: int = 1024,
             precision: str = "bf16-mixed", activation_checkpointing: bool = False) -> MemoryEstimate:
    cfg, counts = model
    return estimate_memory(cfg, strategy, micro_batch_size=micro_batch_size, seq_len=seq_len, world_size=world_size,
                           precision=precision, activation_checkpointing=activation_checkpointing, counts=counts)


def model_states(e: MemoryEstimate) -> int:
    return e.params_bytes + e.grads_bytes + e.optimizer_bytes


@pytest.mark.parametrize(("strategy", "precision", "bytes_per_param"), [
    ("single", "32-true", 4), ("single", "bf16-mixed", 4), ("single", "bf16-true", 2),
    ("deepspeed_zero1", "bf16-mixed", 2),
])
def test_gpt2_124m_param_bytes_are_its_parameters_times_bytes_per_param(strategy, precision, bytes_per_param):
    cfg = load_preset("gpt2_124m")
    e = estimate_memory(cfg, strategy, micro_batch_size=1, seq_len=64, world_size=1, precision=precision,
                        activation_checkpointing=False)
    padding_rows = 50304 - 50257  # one tied matrix holds the padded vocab rows
    assert e.params_bytes == bytes_per_param * (124_439_808 + padding_rows * 768)
    assert count_parameters(cfg).num_parameters == 124_439_808  # the count in conf/model/gpt2_124m.yaml


def test_llama_1b_counts_the_tinyllama_parameters(llama_1b):
    _, counts = llama_1b
    assert counts.num_parameters == counts.stored == 1_100_048_384  # 32000 is already a multiple of 64
    assert counts.largest_module == 32000 * 2048  # the untied embedding / head matrix


@pytest.mark.parametrize("strategy", SHARDED)
def test_sharded_strategies_use_less_memory_as_the_world_grows(llama_1b, strategy):
    totals = [estimate(llama_1b, strategy, world_size=w).total_bytes for w in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(totals, totals[1:])), totals


def test_unsharded_and_offloaded_strategies_scale_as_they_should(llama_1b):
    ddp = {estimate(llama_1b, "ddp", world_size=w).total_bytes for w in (1, 8, 64)}
    assert len(ddp) == 1  # DDP replicates everything
    offload = [estimate(llama_1b, "deepspeed_zero3_offload", world_size=w) for w in (1, 2, 4, 8)]
    assert len({e.total_bytes for e in offload}) == 1  # the GPU holds only what is in flight
    assert all(a.cpu_bytes > b.cpu_bytes for a, b in zip(offload, offload[1:]))


def test_zero3_on_8_gpus_stores_an_eighth_of_the_model_states(llama_1b):
    unsharded = model_states(estimate(llama_1b, "deepspeed_zero1", world_size=1))  # same dtypes, nothing sharded
    assert unsharded == 16 * 1_100_048_384  # the ZeRO paper's 2 + 2 + 12 bytes per parameter
    zero3 = model_states(estimate(llama_1b, "deepspeed_zero3", world_size=8))
    # An eighth, plus the modules gathered in flight (the 65.5M-element head and a prefetch bucket).
    assert unsharded / 8 < zero3 < 1.15 * unsharded / 8
    ddp = model_states(estimate(llama_1b, "ddp", world_size=8))
    assert zero3 < ddp / 8


def test_activation_checkpointing_keeps_little_more_than_the_block_inputs(llama_1b):
    full = estimate(llama_1b, "ddp", micro_batch_size=8, seq_len=2048).activations_bytes
    checkpointed = estimate(llama_1b, "ddp", micro_batch_size=8, seq_len=2048, activation_checkpointing=True)
    block_inputs = 22 * 8 * 2048 * 2048 * 4  # fp32 residual stream under autocast
    assert block_inputs < checkpointed.activations_bytes < full / 3


def test_a_1b_model_does_not_fit_16_gb_with_ddp_but_does_with_zero3_over_8(llama_1b):
    assert not estimate(llama_1b, "ddp", world_size=8, micro_batch_size=2, seq_len=2048).fits(16)
    assert estimate(llama_1b, "deepspeed_zero3", world_size=8, micro_batch_size=2, seq_len=2048).fits(16)


def test_cheapest_is_the_first_that_fits_in_strategy_order():
    def fake(strategy: str, gib: float) -> MemoryEstimate:
        return MemoryEstimate(strategy, 8, 0, 0, 0, int(gib * GiB), 0)

    estimates = [fake("deepspeed_zero3", 10), fake("ddp", 90), fake("deepspeed_zero2", 30), fake("fsdp", 20)]
    assert choose_cheapest(estimates, 80).strategy == "deepspeed_zero2"  # not the smallest (zero3)
    assert choose_cheapest(estimates, 95).strategy == "ddp"
    assert choose_cheapest(estimates, 5) is None


def test_unknown_strategy_is_refused_with_the_valid_names():
    cfg = load_preset("gpt2_124m")
    with pytest.raises(ValueError, match="unknown strategy 'zero4'.*deepspeed_zero3_offload"):
        estimate_memory(cfg, "zero4", micro_batch_size=1, seq_len=64, world_size=1, precision="bf16-mixed",
                        activation_checkpointing=False)
    with pytest.raises(ValueError, match="not supported by strategy=deepspeed_zero2"):
        estimate_memory(cfg, "deepspeed_zero2", micro_batch_size=1, seq_len=64, world_size=1, precision="64-true",
                        activation_checkpointing=False)


def saved_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in a float32 forward and loss."""
    model = build_model(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(idx).flatten(0, 1).float(), idx.flatten())
    return sum(saved.values())


@pytest.mark.parametrize(("mlp", "positional", "n_kv_heads"), [
    ("swiglu", "rope", 2), ("gelu", "learned", None), ("relu", "sinusoidal", 4),
])
def test_activation_count_matches_what_autograd_saves(mlp, positional, n_kv_heads):
    # layernorm: CPU runs rmsnorm as separate ops that save more than CUDA's fused kernel does.
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, d_ff=96,
                      max_seq_len=64, mlp=mlp, positional=positional, norm="layernorm")
    batch, seq_len = 2, 48
    terms = compute_activation_terms(cfg, compute_numerics("single", "32-true"), tokens=batch * seq_len)
    counted = cfg.n_layers * terms.block + terms.head
    # Besides: token ids, the rotary cos/sin tables, the loss's scalar weight.
    assert saved_activation_bytes(cfg, batch, seq_len) == pytest.approx(counted, rel=0.02)


def test_plan_config_rejects_a_seq_len_beyond_the_model_and_two_vocab_sizes():
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=256"):
        PlanConfig(model=ModelConfig(), trainer=dataclasses.replace(PlanConfig().trainer, seq_len=1024))
    with pytest.raises(ValueError, match="set only one"):
        PlanConfig(model=load_preset("gpt2_124m"), vocab_size=32000)


def compose_plan(overrides: list[str]) -> PlanConfig:
    from hydra.core.config_store import ConfigStore

    from lmtrain_testing import compose
    from lmtrain.config import to_typed

    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)  # until lmtrain.config registers it
    return to_typed(compose("plan", overrides))


def test_plan_yaml_composes_and_names_the_cheapest_strategy(capsys):
    cfg = compose_plan(["model=llama_1b", "strategy=deepspeed_zero3", "trainer.devices=8", "gpu_memory_gb=80"])
    estimates = run(cfg)
    out = capsys.readouterr().out
    assert [e.strategy for e in estimates] == [s for s in STRATEGY_ORDER if s != "single"]
    assert "* deepspeed_zero3 " in out and "  ddp " in out
    assert "cheapest strategy that fits: strategy=ddp" in out  # 57 GiB of 80: no sharding needed


def test_plan_says_what_would_fit_when_nothing_does(capsys):
    cfg = compose_plan(["model=llama_1b", "trainer.devices=8", "trainer.seq_len=2048", "gpu_memory_gb=24"])
    run(cfg)
    out = capsys.readouterr().out
    assert "no strategy fits" in out
    assert "trainer.activation_checkpointing=true: strategy=" in out
    assert "trainer.micro_batch_size=" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_estimate_against_measured_peak_on_one_gpu(activation_checkpointing):
    """One process, strategy=single, Lightning's bf16-mixed (autocast over fp32 weights) and fused AdamW."""
    from lmtrain.distributed.parallelize import apply_activation_checkpointing
    from lmtrain.optim import OptimConfig, build_optimizer

    cfg, batch, seq_len = load_preset("llama_160m"), 8, 1024
    model = build_model(cfg).cuda()
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    optimizer = build_optimizer(model, OptimConfig())
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len), device="cuda")
    for step in range(2):  # the second step has AdamW's moments allocated, as every later step does
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(idx).flatten(0, 1).float(), idx.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    e = estimate_memory(cfg, "single", micro_batch_size=batch, seq_len=seq_len, world_size=1, precision="bf16-mixed",
                        activation_checkpointing=activation_checkpointing)
    estimated = e.total_bytes - FIXED_OVERHEAD_BYTES  # max_memory_allocated excludes the context and fragmentation
    print(f"\nllama_160m single bf16-mixed b{batch} s{seq_len} checkpointing={activation_checkpointing}: "
          f"estimated {estimated / GiB:.2f} GiB, measured peak {measured / GiB:.2f} GiB")
    assert 0.8 * measured <= estimated <= 1.25 * measured
