"""`lmtrain inspect` on trained checkpoints, and the same views logged during training: a classifier's
attributions point at the word that decides its label; a language model's views are written,
and the logit lens ends at its own prediction; W&B (offline) and TensorBoard receive the images."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lmtrain_testing import TINY_TRAIN, example_overrides, refusal_line, train_in_process, write_classification_data

pytestmark = pytest.mark.slow

ENCODER = ["model=bert_tiny", "model.d_model=64", "model.n_heads=4", "model.d_ff=128", "model.max_seq_len=128",
           "model.dropout=0.0"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A byte-level encoder fine-tuned on sentences whose label is decided by the verb alone."""
    root = tmp_path_factory.mktemp("inspect-classify")
    train, val = write_classification_data(root / "data")
    run = train_in_process([*example_overrides(train, val), *TINY_TRAIN, *ENCODER, "task=classify",
                            "data.text_column=sentence", "trainer.seq_len=96", "trainer.micro_batch_size=16",
                            "trainer.max_steps=80", "trainer.val_every_steps=80"], root / "cls")
    return run / "checkpoints" / "last.ckpt"


def inspect(ckpt: Path, text: str, out: Path):
    from lmtrain.config import InspectConfig
    from lmtrain.inspection import run

    return run(InspectConfig(ckpt=str(ckpt), text=text, out=str(out), device="cpu"))


def top_word(result) -> str:
    return max(result.word_attributions, key=lambda item: abs(item[1]))[0]


def test_classifier_attributions_point_at_the_verb_and_move_when_it_goes(classifier, tmp_path, capsys):
    positive = inspect(classifier, "The old man helps the moon.", tmp_path / "helps")
    negative = inspect(classifier, "The old man calls the moon.", tmp_path / "calls")
    assert positive.prediction["label"] == "1" and negative.prediction["label"] == "0"
    assert top_word(positive) == "helps" and top_word(negative) == "calls"
    assert len(positive.attributions) == len(positive.ids) == 28  # <|bos|> + 27 bytes
    for result in (positive, negative):
        spread = sum(abs(a) for a in result.attributions)
        assert abs(result.convergence_delta) < 0.05 * spread  # integrated gradients add up to the logit change

    # Without its verb the sentence has no evidence for label 0: the label flips, and no word
    # carries anything like the weight "calls" did.
    removed = inspect(classifier, "The old man the moon.", tmp_path / "removed")
    assert removed.prediction["label"] != "0"
    calls = dict(negative.word_attributions)["calls"]
    assert max(abs(value) for _, value in removed.word_attributions) < 0.5 * abs(calls)

    out = capsys.readouterr().out
    assert "words that drove '0' most: 'calls'" in out
    assert sorted(p.name for p in (tmp_path / "calls").iterdir()) == [
        "attention.png", "attention_mean.png", "attributions.png", "inspect.json"]
    data = json.loads((tmp_path / "calls" / "inspect.json").read_text())
    assert data["prediction"]["label"] == "0" and len(data["attributions"]) == 28
    assert "logit_lens" not in data and any("left out" in note for note in data["notes"])


def test_language_model_views_through_the_cli(prepared, tmp_path, cli):
    """A causal and a masked LM, each a few steps trained, inspected by the real command line."""
    from PIL import Image

    for task, model in (("causal_lm", []), ("masked_lm", ["model.causal=false"])):
        run = train_in_process([*prepared, *TINY_TRAIN, *model, f"task={task}", "trainer.max_steps=6"], tmp_path / task)
        proc = cli(["inspect", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "text=The cat sat on the mat."])
        assert proc.returncode == 0, proc.stderr
        out_dir = run / "inspect" / "step-00000006"  # last.ckpt names the step it points at
        assert f"wrote 5 files to {out_dir}" in proc.stdout and "mean surprisal" in proc.stdout
        data = json.loads((out_dir / "inspect.json").read_text())
        n = len(data["ids"])
        assert n == (24 if task == "causal_lm" else 23)  # the causal model reads from a document-start eos
        assert len(data["attention"]) == 2 and len(data["attention"][0]) == 2 and len(data["attention"][0][0]) == n
        assert [position["ids"][0] for position in data["logit_lens"][-1]] == data["predicted_ids"]
        scored = [s for s in data["surprisal"] if s is not None]
        # causal: every token after the eos, from those before it; masked: every token, with only it masked
        assert len(scored) == (n - 1 if task == "causal_lm" else n) and all(s > 0 for s in scored)
        for name in ("attention", "attention_mean", "logit_lens", "surprisal"):
            with Image.open(out_dir / f"{name}.png") as image:
                assert image.format == "PNG" and min(image.size) >= 300


def test_bad_inspect_input_is_one_line(prepared, tmp_path, cli):
    run = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=2"], tmp_path / "lm")
    proc = cli(["inspect", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"text={'x' * 80}"])
    assert proc.returncode == 2
    assert refusal_line(proc) == ("lmtrain: error: text is 81 tokens long but the model reads at most "
                                  "model.max_seq_len=64; inspect a shorter text")
    proc = cli(["train", *prepared, "logger.inspect_every_steps=5", f"runs_dir={tmp_path}", "run_name=refused"])
    assert proc.returncode == 2 and "logger.inspect_every_steps=5 but logger.inspect_text is empty" in refusal_line(proc)
    assert not (tmp_path / "refused").exists()


def tensorboard_images(directory: Path) -> dict[str, list[int]]:
    """Image summaries in TensorBoard event files, by tag: the steps each was written at.
    Reads the TFRecord framing (length, crc, event, crc) and tensorboardX's Event protobuf."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[int]] = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    found.setdefault(value.tag, []).append(event.step)
    return found


def test_training_logs_the_views_to_wandb_and_tensorboard(prepared, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.finish()  # a run an earlier in-process test left open would be reused by Lightning's logger
    run = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=10", "logger.inspect_every_steps=5",
                            "logger.inspect_text=The cat sat.", "logger.tensorboard=true", "logger.wandb=true",
                            "logger.mode=offline"], tmp_path / "lm")
    views = ["attention", "attention_mean", "logit_lens", "surprisal"]
    for step in (5, 10):
        assert sorted(p.stem for p in (run / "inspect" / f"step-{step:08d}").glob("*.png")) == sorted(views)
    assert tensorboard_images(run / "tensorboard") == {f"inspect/{name}": [5, 10] for name in views}
    # W&B wrote each view's image for both steps into its offline run.
    (offline,) = (run / "wandb").glob("offline-run-*")
    media = sorted(p.name for p in (offline / "files" / "media" / "images" / "inspect").glob("*.png"))
    assert len(media) == 8 and {name.rsplit("_", 2)[0] for name in media} == set(views)
    wandb.finish()
