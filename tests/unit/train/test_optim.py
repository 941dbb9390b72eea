from __future__ import annotations

import pytest
import torch

from lmtrain.model import ModelConfig, build_model
from lmtrain.optim import LRMultiplier, OptimConfig, ScheduleConfig, ScheduleKind, build_optimizer, build_scheduler


def tiny_model(**kw):
    return build_model(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, **kw))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = tiny_model(bias=True, tied_embeddings=False)
    decay, no_decay = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(".bias" in names[id(p)] or "norm" in names[id(p)] or "embeddings" in names[id(p)] for p in no_decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"lm_head.weight", "blocks.0.attn.qkv.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_tied_weight_is_in_one_group_once():
    model = tiny_model(tied_embeddings=True)
    groups = build_optimizer(model, OptimConfig()).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and id(model.lm_head.weight) in {id(p) for p in groups[1]["params"]}


@pytest.mark.parametrize("kind", list(ScheduleKind))
def test_schedules_warm_up_then_reach_the_floor(kind):
    f = LRMultiplier(ScheduleConfig(kind=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2), max_steps=100)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] < 0.2 and f(10) == pytest.approx(1.0)
    if kind is ScheduleKind.constant:
        assert f(99) == 1.0
    else:
        assert f(100) == pytest.approx(0.1) and all(f(s) >= f(s + 1) - 1e-12 for s in range(10, 100))
    if kind is ScheduleKind.wsd:
        assert f(79) == 1.0 and f(90) == pytest.approx(0.55)


def test_scheduler_state_loads_with_weights_only(tmp_path):
    model = tiny_model()
    sched = build_scheduler(build_optimizer(model, OptimConfig()), ScheduleConfig(), max_steps=10)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["lr_lambdas"] == [None, None]  # one per group; the config rules on resume


@pytest.mark.parametrize("field,value,match", [("lr", 0.0, "optim.lr=0.0"), ("beta2", 1.0, "optim.beta2=1.0"),
                                               ("weight_decay", -1.0, "optim.weight_decay=-1.0")])
def test_bad_optim_values_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**{field: value})
