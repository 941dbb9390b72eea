"""Every bad input gets a clear error before compute is spent, naming the value and what to do,
and nothing already on disk is lost."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from lmtrain_testing import TINY_TRAIN, compose, data_overrides, refusal_line, train_in_process, write_corpus
from lmtrain.checkpoint import CheckpointError
from lmtrain.config import to_typed
from lmtrain.checkpoint import resolve_checkpoint


def test_typo_in_override_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", ["trainer.max_stepz=5"])
    assert "max_stepz" in str(e.value.__cause__ or e.value)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", ["trainer.max_steps=abc"])
    cause = str(e.value.__cause__ or e.value)
    assert "abc" in cause and "max_steps" in cause


def test_unknown_preset_lists_the_choices():
    with pytest.raises(MissingConfigException) as e:
        compose("train", ["model=gpt5"])
    assert "gpt5" in str(e.value) and "tiny" in str(e.value) and "gpt2_124m" in str(e.value)


def test_bad_enum_value_lists_the_choices():
    with pytest.raises(ConfigCompositionException) as e:
        compose("train", ["model.positional=alibi"])
    assert "alibi" in str(e.value.__cause__) and "rope" in str(e.value.__cause__)


def test_seq_len_above_model_max_is_refused():
    with pytest.raises(ValueError, match=r"trainer.seq_len=512 exceeds model.max_seq_len=256"):
        to_typed(compose("train", ["trainer.seq_len=512"]))


def test_global_batch_that_does_not_divide_names_the_numbers():
    with pytest.raises(ValueError, match=r"global_batch_size=10 is not a multiple of .*micro_batch_size=4 x world size 2"):
        to_typed(compose("train", ["trainer.global_batch_size=10", "trainer.micro_batch_size=4", "trainer.devices=2"]))


def test_missing_data_path_is_named(tmp_path):
    from lmtrain.data.prepare import prepare_dataset

    typed = to_typed(compose("prepare", data_overrides(tmp_path / "nope" / "*.txt", tmp_path / "cache")))
    with pytest.raises(ValueError, match=r"nope/\*\.txt"):
        prepare_dataset(typed.data, typed.tokenizer, log=lambda _: None)


def test_unprepared_data_says_how_to_prepare(tmp_path):
    corpus = write_corpus(tmp_path / "text")
    with pytest.raises(FileNotFoundError, match=r"lmtrain prepare data=text_files"):
        train_in_process([*data_overrides(corpus, tmp_path / "empty-cache"), *TINY_TRAIN], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_corpus_is_refused(tmp_path):
    from lmtrain.data.prepare import prepare_dataset

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "empty.txt").write_text("\n\n  \n")
    typed = to_typed(compose("prepare", data_overrides(tmp_path / "text" / "empty.txt", tmp_path / "cache")))
    with pytest.raises(ValueError, match="0 documents|empty"):
        prepare_dataset(typed.data, typed.tokenizer, log=lambda _: None)


def test_tokenizer_larger_than_model_vocab(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"has 262 tokens, more than model.vocab_size=100"):
        train_in_process([*prepared, *TINY_TRAIN, "model.vocab_size=100"], tmp_path / "run")


def test_split_too_small_for_seq_len(prepared, tmp_path):
    overrides = [*prepared, *TINY_TRAIN, "model.max_seq_len=100000", "trainer.seq_len=60000"]
    with pytest.raises(ValueError, match=r"fewer than trainer.seq_len\+1"):
        train_in_process(overrides, tmp_path / "run")


def test_token_ids_out_of_range(prepared, tmp_path):
    from lmtrain.data.prepare import prepared_dir

    typed = to_typed(compose("prepare", [o for o in prepared]))
    src = prepared_dir(typed.data, typed.tokenizer)
    copy = tmp_path / "cache" / src.name
    copy.mkdir(parents=True)
    for f in src.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    tokens = np.memmap(copy / "train.bin", dtype=np.uint16, mode="r+")
    tokens[5] = 4000  # corrupt: beyond the byte vocabulary
    tokens.flush()
    overrides = [o if not o.startswith("data.cache_dir") else f"data.cache_dir={tmp_path / 'cache'}" for o in prepared]
    with pytest.raises(ValueError, match=r"token id 4000, out of range for a vocabulary of 262"):
        train_in_process([*overrides, *TINY_TRAIN], tmp_path / "run")


def test_checkpoint_of_another_shape_names_tensors(prepared, tmp_path):
    base = [*prepared, *TINY_TRAIN, "trainer.max_steps=2", "trainer.val_every_steps=100"]
    run_dir = train_in_process(base, tmp_path / "run")
    before = (run_dir / "checkpoints" / "step-00000002.ckpt").read_bytes()
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight: checkpoint \(96, 32\) vs model \(144, 48\)"):
        train_in_process([*base, "model.d_model=48", "model.n_heads=3"], run_dir)
    assert (run_dir / "checkpoints" / "step-00000002.ckpt").read_bytes() == before  # nothing lost


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    # An absurd learning rate without clipping blows the weights up within a few steps.
    overrides = [*prepared, *TINY_TRAIN, "trainer.val_every_steps=100", "trainer.ckpt_every_steps=1",
                 "trainer.keep_last_checkpoints=100", "trainer.max_steps=40", "optim.lr=1e12", "trainer.grad_clip=0",
                 "schedule=constant", "schedule.warmup_steps=0"]
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(NaN or Inf\) at step (\d+)") as e:
        train_in_process(overrides, tmp_path / "run")
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    steps = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*.ckpt"))
    assert steps and max(steps) < bad_step  # nothing saved once a bad loss was seen (metrics number steps from 1)
    last = torch.load(resolve_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt"), weights_only=True)
    assert last["global_step"] == max(steps)


def test_resume_never_refuses_to_overwrite(prepared, tmp_path):
    base = [*prepared, *TINY_TRAIN, "trainer.max_steps=2", "trainer.val_every_steps=100"]
    run_dir = train_in_process(base, tmp_path / "run")
    with pytest.raises(ValueError, match="resume=never but .* already holds checkpoints"):
        train_in_process([*base, "resume=never"], run_dir)


# -- through the CLI: exit 2, one `lmtrain: error:` line naming the value and the fix, nothing touched ---------


@pytest.fixture(scope="module")
def tiny_ckpt(prepared, tmp_path_factory):
    run = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=2", "trainer.val_every_steps=100"],
                           tmp_path_factory.mktemp("bad-cli") / "runs" / "tiny")
    return run / "checkpoints" / "last.ckpt"


def test_a_step_larger_than_the_train_split_is_refused(prepared, tmp_path, cli):
    line = refusal_line(cli(["train", *prepared, *TINY_TRAIN, "trainer.global_batch_size=40000", "run_name=huge"], tmp_path))
    assert "one optimizer step reads 40,000 windows of 32 tokens" in line and "Lower trainer.global_batch_size" in line
    assert not (tmp_path / "runs" / "huge" / "checkpoints").exists()


def test_a_warmup_that_never_ends_is_warned_about(prepared, tmp_path, cli):
    proc = cli(["train", *prepared, *TINY_TRAIN, "trainer.max_steps=3", "schedule.warmup_steps=10",
                "trainer.val_every_steps=100", "trainer.checkpoint=false", "trainer.sample_tokens=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "schedule.warmup_steps=10 is not below trainer.max_steps=3" in proc.stdout


def test_the_default_warmup_fits_a_short_run():
    from lmtrain.optim import ScheduleConfig

    assert ScheduleConfig().resolved_warmup_steps(20) == 4 and ScheduleConfig().resolved_warmup_steps(10_000) == 100
    assert ScheduleConfig(warmup_steps=7).resolved_warmup_steps(20) == 7


@pytest.mark.parametrize("content,expected", [
    (b"good text\n" * 20 + b"caf\xe9 latin-1\n", "is not UTF-8 text: byte 0xe9 at byte offset 203"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not a text file: a NUL byte at byte offset 8"),
], ids=["latin-1", "binary"])
def test_a_source_file_that_is_not_utf8_text_is_named_with_its_offset(tmp_path, cli, content, expected):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    line = refusal_line(cli(["prepare", *data_overrides(bad, tmp_path / "cache")], tmp_path))
    assert f"{bad} {expected}" in line


@pytest.mark.parametrize("unit,expected", [
    ("document", "cut the text into more documents with data.text_unit=paragraph"),
    ("line", "the corpus is one document: give more text"),
])
def test_a_one_document_corpus_gets_advice_that_can_work(tmp_path, cli, unit, expected):
    one = tmp_path / "one.txt"
    one.write_text("a single line of text, and nothing else\n")
    overrides = [o if not o.startswith("data.text_unit=") else f"data.text_unit={unit}"
                 for o in data_overrides(one, tmp_path / "cache")]
    line = refusal_line(cli(["prepare", *overrides], tmp_path))
    assert "the train split is empty" in line or "the val split is empty" in line
    assert expected in line
    if unit == "line":
        assert "text_unit" not in line  # no advice that cannot help


def test_a_run_dir_that_cannot_be_made_is_named(prepared, tmp_path, cli):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "taken").write_text("a file, not a run\n")
    line = refusal_line(cli(["train", *prepared, *TINY_TRAIN, "run_name=taken"], tmp_path))
    assert "cannot create the run directory runs/taken: File exists (a file of that name is in the way)" in line
    assert (tmp_path / "runs" / "taken").read_text() == "a file, not a run\n"
    line = refusal_line(cli(["train", *prepared, *TINY_TRAIN, "runs_dir=/proc/lmtrain-runs", "run_name=x"], tmp_path))
    assert "cannot create the run directory /proc/lmtrain-runs" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_asked_for_without_cuda_is_refused(prepared, tiny_ckpt, tmp_path, cli):
    line = refusal_line(cli(["train", *prepared, *TINY_TRAIN, "trainer.accelerator=gpu", "run_name=g"], tmp_path))
    assert "trainer.accelerator=gpu but this machine has no usable CUDA GPU" in line and "trainer.accelerator=cpu" in line
    line = refusal_line(cli(["generate", f"ckpt={tiny_ckpt}", "device=cuda"], tmp_path))
    assert "device=cuda but this machine has no usable CUDA GPU" in line and "device=cpu" in line


@pytest.mark.parametrize("command,key", [("export", "ckpt"), ("generate", "ckpt"), ("eval", "ckpt"), ("plot", "run")])
def test_a_missing_required_key_is_named(tmp_path, cli, command, key):
    line = refusal_line(cli([command], tmp_path))
    assert f"{key} is required and was not given: add {key}=..." in line


def test_resuming_from_another_tasks_checkpoint_says_so(prepared, tmp_path, cli):
    encoder = ["model=bert_tiny", "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=1"]
    masked = train_in_process([*prepared, *TINY_TRAIN, *encoder, "task=masked_lm", "trainer.max_steps=1",
                               "trainer.val_every_steps=100", "trainer.sample_tokens=0"], tmp_path / "runs" / "mlm")
    ckpt = masked / "checkpoints" / "last.ckpt"
    line = refusal_line(cli(["train", *prepared, *TINY_TRAIN, *encoder, "model.causal=true", f"resume={ckpt}",
                        "trainer.max_steps=2", "run_name=lm"], tmp_path))
    assert f"checkpoint {resolve_checkpoint(ckpt)} was trained for task=masked_lm, but this run trains task=causal_lm" in line
    assert "init_from=" in line
