"""Masked-LM pretraining and the fine-tuned tasks, trained for real on data the tests write:
masked accuracy rises; classification well above chance, and better from a pretrained backbone
than from scratch at equal steps; QA recovers answer spans; translation reaches a high BLEU;
fine-tuning resumes exactly; eval, predict and generate read the checkpoints; bad inputs fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtrain_testing import (
    TINY_TRAIN,
    compose,
    data_overrides,
    example_overrides,
    losses_by_step,
    run_cli,
    train_in_process,
    write_classification_data,
    write_mood_classification_data,
    write_mood_corpus,
    write_qa_data,
    write_translation_data,
)
from lmtrain.checkpoint import CheckpointError

pytestmark = pytest.mark.slow

SIZE = ["model.d_model=64", "model.n_heads=4", "model.d_ff=128", "model.max_seq_len=128"]
ENCODER = ["model=bert_tiny", *SIZE, "model.dropout=0.0"]
FINETUNE = ["trainer.seq_len=96", "trainer.micro_batch_size=16", "trainer.log_every_steps=25"]


def val_rows(run_dir: Path) -> list[dict]:
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val/loss" in row]


@pytest.fixture(scope="module")
def mood(tmp_path_factory) -> list[str]:
    """Overrides naming a prepared byte-level corpus of one-mood paragraphs."""
    from lmtrain.config import to_typed
    from lmtrain.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("mood")
    overrides = data_overrides(write_mood_corpus(root / "text"), root / "cache")
    typed = to_typed(compose("prepare", overrides))
    prepare_dataset(typed.data, typed.tokenizer, log=lambda _: None)
    return overrides


def test_masked_lm_accuracy_rises_and_backs_a_classifier(mood, tmp_path, capsys):
    run = train_in_process([*mood, *TINY_TRAIN, *ENCODER, "task=masked_lm", "trainer.max_steps=200",
                            "trainer.val_every_steps=40", "trainer.seq_len=64", "trainer.micro_batch_size=16"], tmp_path / "mlm")
    accuracy = [row["val/masked_acc"] for row in val_rows(run)]
    assert len(accuracy) == 5 and accuracy[-1] > accuracy[0] + 0.15 and accuracy[-1] > 0.4, accuracy
    assert "val/bpb" not in val_rows(run)[-1]  # bits per byte is a causal-LM measure

    from lmtrain.config import EvalConfig
    from lmtrain.evaluate import run as evaluate

    result = evaluate(EvalConfig(ckpt=str(run / "checkpoints" / "last.ckpt"), device="cpu", val_batches=4))
    assert result["val/masked_tokens"] > 100 and abs(result["val/masked_acc"] - accuracy[-1]) < 0.1

    # the encoder is a backbone: its weights load, the new head is reported as such
    train, val = write_mood_classification_data(tmp_path / "data")
    capsys.readouterr()
    cls = train_in_process([*example_overrides(train, val), *TINY_TRAIN, "task=classify", "data.text_column=sentence",
                            f"init_from={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=30",
                            "trainer.val_every_steps=30", "trainer.seq_len=64", "trainer.micro_batch_size=16"],
                           tmp_path / "cls")
    out = capsys.readouterr().out
    assert "new, freshly initialised: head.proj.bias, head.proj.weight" in out and "model=tiny is not used" in out
    assert val_rows(cls)[-1]["val/accuracy"] > 0.6  # chance is 0.5; measured 0.68 after 30 steps


def test_classify_well_above_chance_then_eval_and_predict(tmp_path):
    train, val = write_classification_data(tmp_path / "data")
    run = train_in_process([*example_overrides(train, val), *TINY_TRAIN, *ENCODER, *FINETUNE, "task=classify",
                            "data.text_column=sentence", "trainer.max_steps=80", "trainer.val_every_steps=40"],
                           tmp_path / "cls")
    last = val_rows(run)[-1]
    assert last["val/accuracy"] >= 0.95 and last["val/macro_f1"] >= 0.95, last  # chance is 0.5

    from lmtrain.config import EvalConfig, PredictConfig
    from lmtrain.evaluate import run as evaluate
    from lmtrain.predict import run as predict

    ckpt = str(run / "checkpoints" / "last.ckpt")
    result = evaluate(EvalConfig(ckpt=ckpt, device="cpu"))
    assert result["val/examples"] == 100 and result["val/accuracy"] == pytest.approx(last["val/accuracy"])
    assert predict(PredictConfig(ckpt=ckpt, text="The old man helps the moon.", device="cpu"))["label"] == "1"
    assert predict(PredictConfig(ckpt=ckpt, text="The old man calls the moon.", device="cpu"))["label"] == "0"


def test_qa_recovers_answer_spans(tmp_path):
    train, val = write_qa_data(tmp_path / "data")
    run = train_in_process([*example_overrides(train, val), *TINY_TRAIN, *SIZE, *FINETUNE, "model.causal=false",
                            "task=qa", "data.id_column=id", "trainer.max_steps=800", "trainer.val_every_steps=800",
                            "task.val_examples=100"], tmp_path / "qa")
    last = val_rows(run)[-1]
    assert last["val/exact_match"] > 60 and last["val/f1"] >= last["val/exact_match"], last  # picking one of 3: 33

    from lmtrain.config import PredictConfig
    from lmtrain.predict import run as predict

    answer = predict(PredictConfig(ckpt=str(run / "checkpoints" / "last.ckpt"), device="cpu", question="what does gina want?",
                                   context="bert sees a kite. gina wants a lamp. hugo has a drum."))
    assert answer["answer"] == "lamp"


def test_translate_reaches_high_bleu(tmp_path):
    train, val = write_translation_data(tmp_path / "data")
    run = train_in_process([*example_overrides(train, val), *TINY_TRAIN, *SIZE, *FINETUNE, "task=translate",
                            "trainer.max_steps=1000", "trainer.val_every_steps=500", "task.bleu_examples=64"],
                           tmp_path / "mt")
    bleu = [row["val/bleu"] for row in val_rows(run)]
    assert bleu[-1] > 85 and bleu[0] < bleu[-1], bleu

    from lmtrain.config import GenerateConfig
    from lmtrain.generate import run as generate

    # source letters a..j map to q..z and come out in reverse order
    assert generate(GenerateConfig(ckpt=str(run / "checkpoints" / "last.ckpt"), prompt="a c e", beam_size=3,
                                   device="cpu")) == ["u s q"]


def test_finetuning_resumes_exactly(tmp_path):
    """Dropout on, a constant LR: stopping at step 6 and continuing to 12 gives the losses of one run to 12."""
    train, val = write_classification_data(tmp_path / "data", n_train=100)
    base = [*example_overrides(train, val), *TINY_TRAIN, *ENCODER, *FINETUNE, "task=classify", "model.dropout=0.1",
            "data.text_column=sentence", "schedule=constant", "trainer.val_every_steps=100", "trainer.ckpt_every_steps=6",
            "trainer.micro_batch_size=8", "trainer.log_every_steps=1"]
    whole = losses_by_step(train_in_process([*base, "trainer.max_steps=12"], tmp_path / "whole"))
    train_in_process([*base, "trainer.max_steps=6"], tmp_path / "split")
    resumed = losses_by_step(train_in_process([*base, "trainer.max_steps=12"], tmp_path / "split"))
    assert [resumed[s] for s in range(7, 13)] == [whole[s] for s in range(7, 13)]


# -- bad input ------------------------------------------------------------------------------------
def test_missing_column_is_one_clear_line(tmp_path):
    train, val = write_classification_data(tmp_path / "data", n_train=20, n_val=10)
    out = run_cli(["train", *example_overrides(train, val), *TINY_TRAIN, "task=classify", "trainer.max_steps=1"],
                  cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert "lmtrain: error: data.text_column='text' is not a column" in out.stderr
    assert "['sentence', 'label']" in out.stderr and "Traceback" not in out.stderr


def test_label_out_of_range_names_row_and_value(tmp_path):
    train, _ = write_classification_data(tmp_path / "data", n_train=20, n_val=10)
    val = tmp_path / "bad_val.jsonl"
    val.write_text(json.dumps({"sentence": "x", "label": 0}) + "\n" + json.dumps({"sentence": "y", "label": 5}) + "\n")
    common = [*example_overrides(train, val), *TINY_TRAIN, "task=classify", "data.text_column=sentence"]
    with pytest.raises(ValueError, match=r"label 5 of val row 1 is out of range for 2 classes \(ids 0..1\)"):
        train_in_process(common, tmp_path / "run")
    with pytest.raises(ValueError, match=r"label 2 of train row 2 is out of range for 2 classes .* task.num_labels \(now 2\)"):
        three = tmp_path / "three.jsonl"
        three.write_text("".join(json.dumps({"sentence": "x", "label": i}) + "\n" for i in range(3)))
        train_in_process([*example_overrides(three, three), *TINY_TRAIN, "task=classify", "data.text_column=sentence",
                          "task.num_labels=2"], tmp_path / "run2")


def test_answer_not_in_context_names_the_example(tmp_path):
    bad = tmp_path / "squad.jsonl"
    bad.write_text(json.dumps({"id": "q7", "question": "who?", "context": "anna has a kite.",
                               "answers": {"text": ["kite"], "answer_start": [3]}}) + "\n")
    with pytest.raises(ValueError, match=r"the answer 'kite' of train example 'q7' is not in its context at answer_start=3"):
        train_in_process([*example_overrides(bad, bad), *TINY_TRAIN, "task=qa", "data.id_column=id"], tmp_path / "run")


def test_mismatched_backbone_is_refused(prepared, mood, tmp_path):
    small = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=2", "trainer.val_every_steps=100"],
                             tmp_path / "small")
    ckpt = small / "checkpoints" / "last.ckpt"
    # another shape: continued pretraining keeps the configured model, and its tensors must fit
    with pytest.raises(CheckpointError, match=r"does not fit this model:\n  model.tok_embeddings.weight"):
        train_in_process([*prepared, *TINY_TRAIN, *SIZE, f"init_from={ckpt}", "trainer.max_steps=1"], tmp_path / "wide")
    # another tokenizer: data prepared with a BPE tokenizer under a byte-level backbone
    bpe = [o if o != "tokenizer=byte" else "tokenizer=bpe" for o in mood] + ["tokenizer.vocab_size=300"]
    from lmtrain.config import to_typed
    from lmtrain.data.prepare import prepare_dataset

    typed = to_typed(compose("prepare", bpe))
    bpe_dir = prepare_dataset(typed.data, typed.tokenizer, log=lambda _: None)
    with pytest.raises(CheckpointError, match=r"init_from=.* was trained with another tokenizer"):
        train_in_process([*bpe, *TINY_TRAIN, f"init_from={ckpt}", "trainer.max_steps=1"], tmp_path / "bpe")
    # fine-tuning with a tokenizer other than the backbone's
    train, val = write_classification_data(tmp_path / "data", n_train=20, n_val=10)
    with pytest.raises(ValueError, match=r"tokenizer.path=.* is not the tokenizer init_from=.* was trained with"):
        train_in_process([*example_overrides(train, val), *TINY_TRAIN, "task=classify", "data.text_column=sentence",
                          f"init_from={ckpt}", "tokenizer=pretrained", f"tokenizer.path={bpe_dir}"],
                         tmp_path / "cls")
