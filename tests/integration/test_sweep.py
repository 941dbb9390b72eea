"""`lmtrain sweep`: a real Optuna study whose trials are real `lmtrain train` processes; killed and
rerun, it finishes only what is left, resuming the interrupted trial from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtrain_testing import CHILD_ENV, TINY_TRAIN, run_cli

pytestmark = pytest.mark.slow


def sweep_args(prepared, tmp_path, name: str) -> list[str]:
    overrides = [*prepared, *TINY_TRAIN, "trainer.max_steps=12", "trainer.val_every_steps=4", "trainer.ckpt_every_steps=4"]
    return ["sweep", f"sweep.name={name}", "sweep.n_trials=3", "sweep.pruner=none", "sweep.n_startup_trials=2",
            f"sweep.sweeps_dir={tmp_path / 'sweeps'}", "sweep.params=['optim.lr: loguniform(1e-3, 1e-2)']",
            "launcher.poll_s=0.5", "sweep.overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]"]


def trials(sweep_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines() if line.strip()]
    return {r["number"]: r for r in rows}  # a later line supersedes an earlier one


def test_three_trials_finish_with_a_best(prepared, tmp_path):
    out = run_cli(sweep_args(prepared, tmp_path, "s3"), cwd=tmp_path, timeout=400).stdout
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
    env = {**os.environ, **CHILD_ENV}
    driver = subprocess.Popen([sys.executable, "-m", "lmtrain", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    trial1_ckpt = sweep_dir / "runs" / "trial-1" / "checkpoints" / "step-00000004.ckpt"
    deadline = time.monotonic() + 300
    while not trial1_ckpt.exists() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.1)
    assert trial1_ckpt.exists(), driver.communicate()[0][-3000:] if driver.poll() is not None else "timed out"
    # The machine goes away: the driver and the running trial die at once.
    trial_pid = int(subprocess.run(["pgrep", "-f", "run_name=trial-1"], capture_output=True, text=True).stdout.split()[0])
    os.killpg(driver.pid, signal.SIGKILL)
    os.killpg(trial_pid, signal.SIGKILL)
    driver.wait()
    before = trials(sweep_dir)
    assert before[0]["state"] == "COMPLETE" and before[1]["state"] == "RUNNING"
    trial0_metrics = (sweep_dir / "runs" / "trial-0" / "metrics.jsonl").read_text()

    out = run_cli(args, cwd=tmp_path, timeout=400).stdout
    after = trials(sweep_dir)
    assert sorted(after) == [0, 1, 2] and all(t["state"] == "COMPLETE" for t in after.values())
    assert "trial 1: resumed" in out and "trial 0" not in out.split("sweep skill")[0].replace("trial 0:", "")
    assert (sweep_dir / "runs" / "trial-0" / "metrics.jsonl").read_text() == trial0_metrics  # trial 0 not rerun
    log = (sweep_dir / "runs" / "trial-1.log").read_text()
    assert "resuming from" in log and "step-00000004.ckpt" in log
