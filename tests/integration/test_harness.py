"""`lmtrain harness`: lm-evaluation-harness on an lmtrain checkpoint through the native model class,
checked against lmtrain's own log-likelihoods and greedy generation, on local tasks the test writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lmtrain_testing import OBJECTS, SUBJECTS, TINY_TRAIN, VERBS, train_in_process
from lmtrain.checkpoint import resolve_checkpoint

pytest.importorskip("lm_eval", reason="lm-eval is in the hf extra (make test installs it)")
pytestmark = pytest.mark.slow


def write_tasks(directory: Path, n: int = 30, seed: int = 0) -> Path:
    """Three local lm-eval tasks over one jsonl: multiple choice (which object follows), rolling
    log-likelihood of whole sentences, and greedy generation until the full stop."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        first, second = rng.sample(OBJECTS, 2)
        context = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)}"
        rows.append({"context": context, "choices": [f" {first}.", f" {second}."], "answer": rng.randrange(2),
                     "text": f"{context} {first}."})
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "sentences.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / "mc.yaml").write_text(
        f"task: lmtrain_mc\n{common}output_type: multiple_choice\ndoc_to_text: \"{{{{context}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (directory / "rolling.yaml").write_text(
        f"task: lmtrain_rolling\n{common}output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (directory / "gen.yaml").write_text(
        f"task: lmtrain_gen\n{common}output_type: generate_until\ndoc_to_text: \"{{{{context}}}}\"\n"
        "doc_to_target: \"{{choices[answer]}}\"\ngeneration_kwargs:\n  until: [\".\"]\n  max_gen_toks: 24\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return directory


@pytest.fixture(scope="module")
def lm(prepared, tmp_path_factory) -> Path:
    run = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=60"], tmp_path_factory.mktemp("harness") / "lm")
    return run / "checkpoints" / "last.ckpt"


def logprob(model, ids: list[int], n_scored: int) -> tuple[float, bool]:
    """log p(last n_scored ids | the ones before), one plain forward."""
    with torch.no_grad():
        log_probs = model(torch.tensor([ids[:-1]]))[0, :, : model.cfg.vocab_size].log_softmax(-1)
    targets = torch.tensor(ids[-n_scored:])
    scored = log_probs[-n_scored:]
    return float(scored.gather(-1, targets[:, None]).sum()), bool((scored.argmax(-1) == targets).all())


def test_harness_scores_equal_lmtrains_own_loglikelihoods_and_generation(lm, tmp_path, cli):
    from lmtrain.inference import load_model, load_run_tokenizer

    tasks = write_tasks(tmp_path / "tasks")
    proc = cli(["harness", f"ckpt={lm}", "tasks=[lmtrain_mc,lmtrain_rolling,lmtrain_gen]", f"include_path={tasks}",
                "batch_size=7"])
    assert proc.returncode == 0, proc.stderr
    assert "|lmtrain_mc" in proc.stdout and "acc" in proc.stdout  # lm-eval's own table
    saved = json.loads((lm.parent.parent / "harness" / f"{resolve_checkpoint(lm).stem}.json").read_text())
    scores = saved["scores"]

    model, record = load_model(lm, "cpu")
    tok = load_run_tokenizer(lm, record)
    rows = [json.loads(line) for line in (tasks / "sentences.jsonl").read_text().splitlines()]
    # multiple choice: the choice with the higher log-likelihood, from plain forwards
    correct = 0
    for row in rows:
        context = tok.encode(row["context"])
        lls = [logprob(model, context + tok.encode(choice), len(tok.encode(choice)))[0] for choice in row["choices"]]
        correct += int(max(range(2), key=lls.__getitem__) == row["answer"])
    assert scores["harness/lmtrain_mc/acc"] == pytest.approx(correct / len(rows), abs=1e-9)
    assert 0 < correct < len(rows)  # both outcomes occur: the comparison above can tell scorers apart

    # rolling: each sentence scored from a document boundary (eos), as bits per byte
    nats = sum(-logprob(model, [tok.eos_id, *tok.encode(row["text"])], len(tok.encode(row["text"])))[0] for row in rows)
    n_bytes = sum(len(row["text"].encode()) for row in rows)
    assert scores["harness/lmtrain_rolling/bits_per_byte"] == pytest.approx(nats / n_bytes / 0.6931471805599453, rel=1e-5)

    # generation: greedy with the KV cache, cut at the first full stop, compared with each target
    matches = 0
    for row in rows:
        ids = tok.encode(row["context"])
        out = model.generate(torch.tensor([ids]), 24, temperature=0.0, eos_id=tok.eos_id)[0, len(ids):].tolist()
        text = tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out).split(".")[0]
        matches += int(text == row["choices"][row["answer"]].rstrip("."))
    assert scores["harness/lmtrain_gen/exact_match"] == pytest.approx(matches / len(rows))


def test_the_hf_export_scored_by_lm_evals_own_hf_backend_matches_the_native_one(lm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmtrain.config import ExportConfig, ExportFormat, HarnessTasks
    from lmtrain.export import run as export
    from lmtrain.harness import evaluate, scores
    from lmtrain.inference import load_model, load_run_tokenizer

    tasks = write_tasks(tmp_path / "tasks")
    export(ExportConfig(ckpt=str(lm), format=ExportFormat.hf, out=str(tmp_path / "hf")))
    names = ["lmtrain_mc", "lmtrain_rolling"]
    via_hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32",
                                                             "device": "cpu"},
                                     tasks=names, task_manager=TaskManager(include_path=str(tasks)), log_samples=False,
                                     bootstrap_iters=0)
    model, record = load_model(lm, "cpu")
    native = evaluate(model, load_run_tokenizer(lm, record), HarnessTasks(tasks=names, include_path=str(tasks)))
    hf_scores, native_scores = scores(via_hf), scores(native)
    assert hf_scores.keys() == native_scores.keys() and "harness/lmtrain_rolling/bits_per_byte" in hf_scores
    for key, value in native_scores.items():
        assert hf_scores[key] == pytest.approx(value, rel=1e-5), key


def test_harness_refuses_what_it_cannot_score(lm, tmp_path, cli):
    from lmtrain_testing import refusal_line

    proc = cli(["harness", f"ckpt={lm}", "tasks=[no_such_task_anywhere]", f"include_path={write_tasks(tmp_path / 't')}"])
    assert proc.returncode == 2 and "lm-eval knows no task ['no_such_task_anywhere']" in refusal_line(proc)
    proc = cli(["harness", f"ckpt={lm}"])
    assert proc.returncode == 2 and "tasks is empty" in refusal_line(proc)


def test_harness_during_training_is_logged_and_leaves_training_alone(prepared, tmp_path):
    from lmtrain_testing import losses_by_step
    from lmtrain.loggers import read_metrics

    tasks = write_tasks(tmp_path / "tasks")
    common = [*prepared, *TINY_TRAIN, "trainer.max_steps=10", "model.dropout=0.1"]
    plain = train_in_process(common, tmp_path / "plain")
    scored = train_in_process([*common, "harness.tasks=[lmtrain_mc]", "harness.every_steps=5", "harness.limit=12",
                               f"harness.include_path={tasks}"], tmp_path / "scored")
    rows = [row for row in read_metrics(scored / "metrics.jsonl") if "harness/lmtrain_mc/acc" in row]
    assert [row["step"] for row in rows] == [5, 10]
    assert all(0.0 <= row["harness/lmtrain_mc/acc"] <= 1.0 for row in rows)
    saved = json.loads((scored / "harness" / "step-00000010.json").read_text())
    assert saved["scores"]["harness/lmtrain_mc/acc"] == rows[-1]["harness/lmtrain_mc/acc"]
    assert losses_by_step(scored) == losses_by_step(plain)  # lm-eval's reseeding does not reach training


def test_sweep_can_optimize_a_harness_score_only_when_the_trials_log_it():
    from lmtrain_testing import compose
    from lmtrain.config import to_typed
    from lmtrain.sweep import check_metric

    logged = to_typed(compose("train", ["harness.tasks=[arc_easy]", "harness.every_steps=50", "trainer.max_steps=100"]))
    check_metric("harness/arc_easy/acc", logged, "lr=0.001")
    with pytest.raises(ValueError, match=r"logged only for the tasks of harness.tasks \(now \[\]"):
        check_metric("harness/arc_easy/acc", to_typed(compose("train", [])), "lr=0.001")
    late = to_typed(compose("train", ["harness.tasks=[arc_easy]", "harness.every_steps=500", "trainer.max_steps=100"]))
    with pytest.raises(ValueError, match="stops at trainer.max_steps=100: no trial would log it"):
        check_metric("harness/arc_easy/acc", late, "lr=0.001")


def test_harness_scores_join_the_runs_own_wandb_run(prepared, tmp_path):
    import subprocess
    import sys

    from lmtrain_testing import run_cli
    from lmtrain.loggers import load_wandb_state

    import wandb

    wandb.finish()  # a W&B run an earlier in-process test left open would be reused by Lightning's logger
    run = train_in_process([*prepared, *TINY_TRAIN, "trainer.max_steps=4", "logger.wandb=true", "logger.mode=offline"],
                           tmp_path / "lm")
    run_id = load_wandb_state(run)["run_id"]
    wandb.finish()  # as the training process's exit would: W&B refuses a run id still in use
    run_cli(["harness", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "tasks=[lmtrain_mc]", "wandb=true",
             f"include_path={write_tasks(tmp_path / 'tasks')}"], cwd=tmp_path, env={"WANDB_SILENT": "true"})
    acc = json.loads((run / "harness" / "step-00000004.json").read_text())["scores"]["harness/lmtrain_mc/acc"]
    attempts = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2  # training's, then the harness's: one W&B run id, synced as one run
    # Read back what W&B wrote, with its own reader.
    wandb_cli = Path(sys.executable).with_name("wandb")
    records = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(attempts[-1] / f"run-{run_id}.wandb")],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    rows = [json.loads(line)["history"]["item"] for line in records if '"history"' in line]
    assert [(row["harness/lmtrain_mc/acc"], row["harness/checkpoint_step"]) for row in rows] == [(acc, 4)]


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_harness_during_training_on_two_ranks(prepared, tmp_path, strategy):
    """DDP scores on rank 0 while rank 1 waits at a barrier; FSDP (sharded) scores on both ranks in
    lockstep. Either way the run goes on, and rank 0 logs the scores once per scoring step."""
    from lmtrain_testing import run_cli
    from lmtrain.loggers import read_metrics

    tasks = write_tasks(tmp_path / "tasks", n=8)
    run_cli(["train", *prepared, *TINY_TRAIN, "trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.micro_batch_size=2", f"strategy={strategy}", "harness.tasks=[lmtrain_mc,lmtrain_gen]",
             "harness.every_steps=2", f"harness.include_path={tasks}", "run_name=two"], cwd=tmp_path)
    rows = [row for row in read_metrics(tmp_path / "runs" / "two" / "metrics.jsonl") if "harness/lmtrain_mc/acc" in row]
    assert [row["step"] for row in rows] == [2, 4] and all("harness/lmtrain_gen/exact_match" in row for row in rows)
