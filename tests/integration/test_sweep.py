"""`lmtrain sweep`: a real Optuna study whose trials are real `lmtrain train` processes; killed and
rerun, it finishes only what is left, resuming the interrupted trial from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from lmtrain.sweep import SweepSpec, check_trials_scorable, compute_failure_reason, loggable_metrics, parse_param
from lmtrain.tasks.config import TaskKind
from lmtrain_testing import (
    TINY_TRAIN,
    example_overrides,
    run_cli,
    start_cli,
    train_in_process,
    tree_signature,
    wait_for,
    write_classification_data,
    write_qa_data,
    write_translation_data,
)

pytestmark = pytest.mark.slow


def sweep_args(prepared, tmp_path, name: str, *, n_trials: int = 3, param: str = "optim.lr: loguniform(1e-3, 1e-2)",
               metric: str = "val/loss") -> list[str]:
    overrides = [*prepared, *TINY_TRAIN, "trainer.max_steps=12", "trainer.val_every_steps=4", "trainer.ckpt_every_steps=4"]
    return ["sweep", f"sweep.name={name}", f"sweep.n_trials={n_trials}", "sweep.pruner=none", "sweep.n_startup_trials=2",
            f"sweep.sweeps_dir={tmp_path / 'sweeps'}", f"sweep.params=['{param}']", f"sweep.metric={metric}",
            "launcher.poll_s=0.5", "sweep.overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]"]


def trials(sweep_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines() if line.strip()]
    return {r["number"]: r for r in rows}  # a later line supersedes an earlier one


def test_three_trials_finish_with_a_best(prepared, tmp_path):
    out = run_cli(sweep_args(prepared, tmp_path, "s3"), cwd=tmp_path, watch=[tmp_path / "sweeps"]).stdout
    sweep_dir = tmp_path / "sweeps" / "s3"
    final = trials(sweep_dir)
    assert sorted(final) == [0, 1, 2] and all(t["state"] == "COMPLETE" for t in final.values())
    assert sorted(p.name for p in (sweep_dir / "runs").iterdir() if p.is_dir()) == ["trial-0", "trial-1", "trial-2"]
    best = min(final.values(), key=lambda t: t["value"])
    assert f"best: trial {best['number']}" in out
    lrs = [t["params"]["optim.lr"] for t in final.values()]
    assert len(set(lrs)) == 3 and all(1e-3 <= lr <= 1e-2 for lr in lrs)
    from lmtrain.reports import sweep_report

    rows, pngs = sweep_report(sweep_dir)  # the report reads what the real sweep wrote
    assert len(rows) == 3 and [p.name for p in pngs] == ["objective_vs_optim.lr.png"]


def test_a_killed_sweep_resumes_the_running_trial_and_finishes(prepared, tmp_path):
    args = sweep_args(prepared, tmp_path, "skill")
    sweep_dir = tmp_path / "sweeps" / "skill"
    # Trial 1 stops after its step-4 checkpoint until it is killed: the kill lands mid-trial by construction.
    driver = start_cli(args, cwd=tmp_path, env={"LMTRAIN_FAULT": "hold:4", "LMTRAIN_FAULT_RUN": "trial-1"},
                       merge_stderr=True)
    trial1_log = sweep_dir / "runs" / "trial-1.log"
    wait_for(lambda: "holding after step 4" in (trial1_log.read_text() if trial1_log.exists() else "")
             or driver.poll() is not None, what="trial 1 to hold after its step-4 checkpoint",
             progress=lambda: tree_signature([sweep_dir]))
    assert driver.poll() is None, driver.communicate()[0][-3000:]
    assert (sweep_dir / "runs" / "trial-1" / "checkpoints" / "step-00000004.ckpt").exists()
    # The machine goes away: the driver and the running trial die at once.
    trial_pid = int(subprocess.run(["pgrep", "-f", "run_name=trial-1"], capture_output=True, text=True).stdout.split()[0])
    os.killpg(driver.pid, signal.SIGKILL)
    os.killpg(trial_pid, signal.SIGKILL)
    driver.wait()
    before = trials(sweep_dir)
    assert before[0]["state"] == "COMPLETE" and before[1]["state"] == "RUNNING"
    trial0_metrics = (sweep_dir / "runs" / "trial-0" / "metrics.jsonl").read_text()

    out = run_cli(args, cwd=tmp_path, watch=[sweep_dir]).stdout
    after = trials(sweep_dir)
    assert sorted(after) == [0, 1, 2] and all(t["state"] == "COMPLETE" for t in after.values())
    assert "trial 1: resumed" in out and "trial 0" not in out.split("sweep skill")[0].replace("trial 0:", "")
    assert (sweep_dir / "runs" / "trial-0" / "metrics.jsonl").read_text() == trial0_metrics  # trial 0 not rerun
    log = (sweep_dir / "runs" / "trial-1.log").read_text()
    assert "resuming from" in log and "step-00000004.ckpt" in log


# -- sweeps whose trials cannot be scored, and trials that fail ---------------------------------------


@pytest.mark.parametrize("key", ["optim.lrr", "+optim.lrr"])
def test_an_unknown_param_key_is_refused_before_any_trial(prepared, tmp_path, key, cli):
    out = cli(sweep_args(prepared, tmp_path, "badkey", param=f"{key}: loguniform(1e-3, 1e-2)"), tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("lmtrain: error: sweep.params key") and "'optim.lrr' is not a key" in error
    assert "did you mean 'optim.lr'?" in error
    assert not (tmp_path / "sweeps").exists()  # refused before the study, a run dir or a trial


def test_an_unknown_metric_is_refused_naming_the_valid_ones(prepared, tmp_path, cli):
    out = cli(sweep_args(prepared, tmp_path, "badmetric", metric="val/lsos"), tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert "sweep.metric='val/lsos' is not logged by a task=causal_lm run" in error
    assert "val/loss, val/ppl, val/bpb, train/loss" in error
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("param, overrides, message", [
    ("optim.lr: uniform(-1, 1e-2)", [], "a trial with optim.lr=-1.0 would fail before training: optim.lr=-1.0 must be > 0"),
    ("model: choice(tiny, nope)", [], "a trial with model=nope would fail before training: .*Could not find 'model/nope'"),
    ("optim.lr: loguniform(1e-3, 1e-2)", ["trainer.max_steps=10", "trainer.val_every_steps=20"],
     "every trainer.val_every_steps=20 steps, but a trial with .* stops at trainer.max_steps=10"),
    ("optim.lr: loguniform(1e-3, 1e-2)", ["trainer.max_stepz=10"],
     "sweep.overrides entry 'trainer.max_stepz=10': .* did you mean 'trainer.max_steps'"),
])
def test_values_and_overrides_no_trial_could_use_are_refused(param, overrides, message):
    spec = SweepSpec(params=[param], overrides=overrides)
    with pytest.raises(ValueError, match=message):
        check_trials_scorable(spec, dict([parse_param(param)]))


def test_a_sweep_whose_trials_all_fail_exits_non_zero_with_the_reason(prepared, tmp_path, capsys):
    # Composes (any cache_dir is a valid value) but no trial finds prepared data when it starts.
    unprepared = [o for o in prepared if not o.startswith("data.cache_dir=")] + [f"data.cache_dir={tmp_path / 'empty'}"]
    out = run_cli(sweep_args(unprepared, tmp_path, "allfail", n_trials=2), cwd=tmp_path, check=False,
                  watch=[tmp_path / "sweeps"])
    assert out.returncode != 0, out.stdout + out.stderr
    assert "trial 0: failed: exit 2: lmtrain: error: prepared dataset" in out.stdout
    assert "sweep allfail: 0 complete, 2 failed of 2 trials" in out.stdout
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("lmtrain: error: sweep allfail: 2 of 2 trials failed; the first, trial 0, with: "
                            "exit 2: lmtrain: error: prepared dataset"), error
    sweep_dir = tmp_path / "sweeps" / "allfail"
    final = trials(sweep_dir)
    assert [t["state"] for t in final.values()] == ["FAIL", "FAIL"]
    assert all("does not exist; run `lmtrain prepare" in t["reason"] for t in final.values())
    from lmtrain.reports import sweep_report

    with pytest.raises(ValueError, match="no completed trial"):
        sweep_report(sweep_dir)  # the table and trials.csv are written first
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-1] == "reason" and "exit 2: lmtrain: error: prepared dataset" in table[1]
    assert "exit 2: lmtrain: error: prepared dataset" in (sweep_dir / "report" / "trials.csv").read_text()


def test_a_crashed_trial_records_its_exception_and_the_sweep_still_succeeds(prepared, tmp_path):
    out = run_cli(sweep_args(prepared, tmp_path, "onecrash", n_trials=2), cwd=tmp_path, watch=[tmp_path / "sweeps"],
                  env={"LMTRAIN_FAULT": "crash:0:2", "LMTRAIN_FAULT_RUN": "trial-1"})
    final = trials(tmp_path / "sweeps" / "onecrash")
    assert final[0]["state"] == "COMPLETE" and final[0]["reason"] is None
    assert final[1]["state"] == "FAIL"
    assert final[1]["reason"] == "exit 1: RuntimeError: LMTRAIN_FAULT: injected crash of rank 0 at step 2"
    assert f"trial 1: failed: {final[1]['reason']}" in out.stdout and "best: trial 0" in out.stdout


def test_failure_reason_is_the_last_error_line():
    traceback = ("step 1/12 | loss 5.1\nTraceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
                 "    raise ValueError('inner')\nValueError: inner\n\nThe above exception was the direct cause:\n"
                 "torch.OutOfMemoryError: CUDA out of memory\n\n"
                 "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n")
    assert compute_failure_reason(1, traceback, "val/loss") == "exit 1: torch.OutOfMemoryError: CUDA out of memory"
    assert compute_failure_reason(2, "lmtrain: error: bad\nValueError: x\n", "val/loss") == "exit 2: lmtrain: error: bad"
    assert compute_failure_reason(-9, "step 3/12 | loss 4.0\n", "val/loss") == "killed by SIGKILL: step 3/12 | loss 4.0"
    assert compute_failure_reason(None, "", "val/loss") == "failed: no output"  # a SLURM job that left no log
    assert compute_failure_reason(0, "trained to step 12\n", "val/f1") == "finished but never logged val/f1"


# Each task's tiny run: the metric list the sweep checks against must be what a real run logs.
TASK_RUNS = {
    TaskKind.causal_lm: lambda prepared, data: [*prepared],
    TaskKind.masked_lm: lambda prepared, data: [*prepared, "model=bert_tiny", "task=masked_lm"],
    TaskKind.classify: lambda prepared, data: [*example_overrides(*write_classification_data(data, 64, 16)),
                                               "task=classify", "data.text_column=sentence"],
    TaskKind.qa: lambda prepared, data: [*example_overrides(*write_qa_data(data, 64, 8)), "task=qa",
                                         "data.id_column=id", "model.causal=false"],
    TaskKind.translate: lambda prepared, data: [*example_overrides(*write_translation_data(data, 64, 8)),
                                                "task=translate", "task.bleu_examples=4", "task.max_target_tokens=8"],
}


@pytest.mark.parametrize("kind", list(TaskKind), ids=lambda k: k.value)
def test_the_metrics_a_sweep_accepts_are_the_ones_a_run_logs(prepared, tmp_path, kind):
    size = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=128", "trainer.seq_len=96"]
    run = train_in_process([*TASK_RUNS[kind](prepared, tmp_path / "data"), *TINY_TRAIN, *size, "trainer.max_steps=3",
                            "trainer.val_every_steps=3", "trainer.checkpoint=false", "trainer.sample_tokens=0",
                            "task.val_examples=8"], tmp_path / "run")
    logged = {k for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) for k in row} - {"step"}
    accepted = set(loggable_metrics(kind))
    assert logged <= accepted, f"{kind.value} logs {sorted(logged - accepted)}, which loggable_metrics lacks"
    assert {m for m in accepted if m.startswith(("val/", "data/"))} | {"train/loss"} <= logged
