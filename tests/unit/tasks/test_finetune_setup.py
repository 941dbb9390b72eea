"""Fine-tuning's optimizer setup (layer-wise LR decay, a frozen backbone) and csv/tsv examples."""

from __future__ import annotations

import pytest

from lmtrain.model import ModelConfig
from lmtrain.optim import OptimConfig, ScheduleConfig
from lmtrain.tasks.config import TaskConfig
from lmtrain.tasks.finetune import ClassifyTask


def classifier(**task) -> ClassifyTask:
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, tied_embeddings=False)
    return ClassifyTask(cfg, OptimConfig(lr=1e-3), ScheduleConfig(), max_steps=10, seed=0, grad_clip=1.0, accumulate=1,
                        task_cfg=TaskConfig(kind="classify", **task), label_names=["a", "b"])


def test_layer_wise_lr_decay():
    task = classifier(layer_lr_decay=0.5)
    optimizer = task.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in task.named_parameters()}
    lr_of = {names[id(p)]: g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}  # peak LRs
    assert lr_of["head.proj.weight"] == pytest.approx(1e-3) and lr_of["model.norm.weight"] == pytest.approx(1e-3)
    assert lr_of["model.blocks.1.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["model.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.25)
    assert lr_of["model.tok_embeddings.weight"] == pytest.approx(1e-3 * 0.125)
    assert "model.lm_head.weight" not in lr_of  # untied and unused by a classifier: frozen
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups if any(
        names[id(p)].endswith("bias") for p in g["params"]))


def test_frozen_backbone_trains_the_head_only():
    task = classifier(freeze_backbone=True)
    optimizer = task.configure_optimizers()["optimizer"]
    trained = {n for n, p in task.named_parameters() for g in optimizer.param_groups for q in g["params"] if p is q}
    assert trained == {"head.proj.weight", "head.proj.bias"}


def test_csv_and_tsv_examples(tmp_path):
    from lmtrain.data.config import DataConfig
    from lmtrain.data.examples import load_splits

    (tmp_path / "train.tsv").write_text("text\tlabel\nfine film\t1\nawful, truly\t0\n")
    data = DataConfig(name="t", source="csv", csv_delimiter="\t", paths=[str(tmp_path / "train.tsv")], val_fraction=0.5)
    train, val = load_splits(data)
    assert sorted([*train["text"], *val["text"]]) == ["awful, truly", "fine film"] and len(val) == 1
    with pytest.raises(ValueError, match="data.csv_delimiter=';;' must be one character"):
        DataConfig(name="t", source="csv", paths=["x"], csv_delimiter=";;")
