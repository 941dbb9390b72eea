"""One typed record and one loader for every trained model (lmtrain.trained): typed configs from a
checkpoint, older records keep loading with the schemas' defaults, and bad checkpoints fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmtrain_testing import TINY_TRAIN, train_in_process
from lmtrain.checkpoint import resolve_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(prepared, tmp_path_factory) -> Path:
    run = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=3", "trainer.seq_len=24"],
                           tmp_path_factory.mktemp("loader") / "lm")
    return run / "checkpoints" / "last.ckpt"


def test_the_record_is_typed(ckpt):
    from lmtrain.config import TrainerConfig
    from lmtrain.model.config import ModelConfig, Positional
    from lmtrain.tasks.config import TaskKind
    from lmtrain.trained import load_trained, read_record

    run = read_record(ckpt)
    assert run.kind is TaskKind.causal_lm and run.step == 3
    assert isinstance(run.model, ModelConfig) and run.model.positional is Positional.rope and run.model.vocab_size == 262
    assert isinstance(run.trainer, TrainerConfig) and run.trainer.seq_len == 24 and run.trainer.micro_batch_size == 4
    assert run.data_dir is not None and (run.data_dir / "train.bin").is_file() and run.version
    trained = load_trained(ckpt, "cpu")
    assert trained.tokenizer.fingerprint() == run.tokenizer_hash and not trained.module.training


def test_an_older_record_loads_with_the_schemas_defaults(ckpt, tmp_path):
    """A record from before an option existed (here: no trainer.micro_batch_size, no task section)
    or with one since removed still loads: defaults come from the schemas, unknown keys are dropped."""
    from lmtrain.config import TrainerConfig
    from lmtrain.tasks.config import TaskKind
    from lmtrain.trained import load_trained

    saved = torch.load(resolve_checkpoint(ckpt), weights_only=True)
    old = saved["lmtrain"]
    del old["config"]["trainer"]["micro_batch_size"], old["task"]
    old["config"]["trainer"]["retired_option"] = 1
    old["model_config"]["retired_model_option"] = True
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "tokenizer").symlink_to(ckpt.resolve().parent.parent / "tokenizer")
    torch.save(saved, tmp_path / "checkpoints" / "old.ckpt")
    old_model = load_trained(tmp_path / "checkpoints" / "old.ckpt", "cpu")
    assert old_model.kind is TaskKind.causal_lm and old_model.run.trainer.micro_batch_size == TrainerConfig().micro_batch_size
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old_model.model(batch), load_trained(ckpt, "cpu").model(batch))


def test_a_file_that_is_no_lmtrain_checkpoint_is_one_line(tmp_path):
    from lmtrain.checkpoint import CheckpointError
    from lmtrain.trained import read_record

    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"other.ckpt is not an lmtrain checkpoint \(no 'state_dict'/'lmtrain' record"):
        read_record(tmp_path / "other.ckpt")
