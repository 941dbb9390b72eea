"""lmtrain on the local two-node SLURM cluster: `lmtrain submit` of a real 2-node DDP job,
preemption (signal -> step finished -> checkpoint -> requeue -> resume, bitwise), a refused
submission, and a job whose rank dies."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from lmtrain.sweep import FINAL_STATE_HOLD_S

from lmtrain_testing import TINY_TRAIN, losses_by_step, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

TRAIN = ["trainer.val_every_steps=100", "trainer.accelerator=cpu", "trainer.micro_batch_size=2",
         "trainer.global_batch_size=4", "model.dropout=0.1", f"cluster.command={sys.executable} -m lmtrain",
         "slurm.nodes=2", "slurm.gpus_per_node=1", "slurm.time=10:00"]


def submit(cluster, prepared, tmp_path, *extra, env=None) -> tuple[str, Path]:
    proc = run_cli(["submit", *prepared, *TINY_TRAIN, *TRAIN, f"runs_dir={tmp_path / 'runs'}", *extra],
                   cwd=tmp_path, env={**cluster.env, **(env or {})})
    job = proc.stdout.split("submitted job ")[1].split(";")[0]
    run_dir = Path(proc.stdout.split("run dir ")[1].split(";")[0])
    return job, run_dir


def release_requeued(cluster, job: str, timeout_s: float = 120) -> None:
    """A requeued job waits ~120 s (BeginTime) once PENDING; start it now. The update only takes
    while the job is PENDING, so retry through REQUEUED/COMPLETING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("JobState") == "PENDING" and info.get("Restarts") == "1":
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        elif info.get("JobState") == "RUNNING" and info.get("Restarts") == "1":
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued and restarted within {timeout_s} s: {cluster.job(job)}")


def log_of(run_dir: Path, job: str) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def test_two_node_job_trains_with_one_rank_per_node(slurm_cluster, prepared, tmp_path):
    job, run_dir = submit(slurm_cluster, prepared, tmp_path, "trainer.max_steps=6", "run_name=two_nodes")
    state = slurm_cluster.wait(job, timeout_s=240)
    log = log_of(run_dir, job)
    assert state == "COMPLETED", log[-4000:]
    assert "2 ranks" in log and "n[1-2]" in log
    assert sorted(losses_by_step(run_dir)) == list(range(1, 7))
    assert (run_dir / "submit.sbatch").is_file() and (run_dir / "checkpoints" / "last.ckpt").exists()


def test_preemption_requeues_and_resumes_exactly(slurm_cluster, prepared, tmp_path):
    steps = 40
    ref_job, ref_dir = submit(slurm_cluster, prepared, tmp_path, f"trainer.max_steps={steps}", "run_name=ref")
    assert slurm_cluster.wait(ref_job, timeout_s=300) == "COMPLETED", log_of(ref_dir, ref_job)[-4000:]

    job, run_dir = submit(slurm_cluster, prepared, tmp_path, f"trainer.max_steps={steps}", "run_name=preempted",
                          "trainer.ckpt_every_steps=1000", "logger=wandb", "logger.mode=offline")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(losses_by_step(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 5:
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@grace or a preempting scheduler sends
    release_requeued(slurm_cluster, job)
    state = slurm_cluster.wait(job, timeout_s=300)
    log = log_of(run_dir, job)
    assert state == "COMPLETED", log[-5000:]
    assert slurm_cluster.job(job).get("Restarts") == "1"
    assert "USR1 received: saving at step" in log and "requeued job" in log and "resuming from" in log
    ref, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    assert [got[s] for s in range(1, steps + 1)] == [ref[s] for s in range(1, steps + 1)]  # bitwise
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1 and len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # one run, two attempts


def test_mismatched_tasks_and_devices_are_refused_before_sbatch(slurm_cluster, prepared, tmp_path):
    before = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    proc = run_cli(["submit", *prepared, *TINY_TRAIN, *TRAIN, "trainer.devices=2", f"runs_dir={tmp_path}/runs",
                    "run_name=bad"], cwd=tmp_path, env=slurm_cluster.env, check=False)
    assert proc.returncode == 2
    assert "slurm.gpus_per_node=1 tasks per node but trainer.devices=2" in proc.stderr
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split() == before


def test_a_dying_rank_fails_the_job_without_requeue_and_keeps_the_checkpoint(slurm_cluster, prepared, tmp_path):
    job, run_dir = submit(slurm_cluster, prepared, tmp_path, "trainer.max_steps=20", "trainer.ckpt_every_steps=2",
                          "run_name=crash", env={"LMTRAIN_FAULT": "crash:1:5"})
    state = slurm_cluster.wait(job, timeout_s=240)
    assert state == "FAILED", log_of(run_dir, job)[-4000:]
    assert slurm_cluster.job(job).get("Restarts", "0") == "0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_sweep_runs_its_trials_as_slurm_jobs(slurm_cluster, prepared, tmp_path):
    overrides = [*prepared, *TINY_TRAIN, "trainer.max_steps=8", "trainer.val_every_steps=4", "trainer.accelerator=cpu"]
    submit = [f"cluster.command={sys.executable} -m lmtrain", "slurm.nodes=1", "slurm.gpus_per_node=1", "slurm.time=10:00"]
    out = run_cli(["sweep", "sweep.name=sl", "sweep.n_trials=2", "sweep.pruner=none", f"sweep.sweeps_dir={tmp_path}",
                   "sweep.params=['optim.lr: loguniform(1e-3, 1e-2)']", "launcher=slurm", "launcher.parallel=2",
                   "launcher.poll_s=1", "sweep.overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]",
                   "launcher.submit_overrides=[" + ",".join(f"'{o}'" for o in submit) + "]"],
                  cwd=tmp_path, env=slurm_cluster.env, timeout=400).stdout
    runs = tmp_path / "sl" / "runs"
    for n in (0, 1):
        assert list((runs / f"trial-{n}").glob("slurm-*.out")), f"trial {n} did not run as a SLURM job"
        assert sorted(losses_by_step(runs / f"trial-{n}")) == list(range(1, 9))
    assert "best: trial" in out


def test_time_limit_signal_requeues_and_the_job_completes(slurm_cluster, prepared, tmp_path):
    """slurm.time=1:00 with a 30 s grace: SLURM itself sends USR1 30 s into each attempt; each
    attempt saves, requeues and the next continues, until the 1500 steps are done."""
    steps = 1500
    job, run_dir = submit(slurm_cluster, prepared, tmp_path, f"trainer.max_steps={steps}", "run_name=limited",
                          "slurm.time=1:00", "cluster.grace_s=30", "trainer.ckpt_every_steps=100000",
                          "trainer.log_every_steps=50")
    deadline, final_since = time.monotonic() + 420, None
    while time.monotonic() < deadline:
        info = slurm_cluster.job(job)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", "0")) > 0:
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        # A job that requeues itself shows FAILED for a moment on its way back to PENDING.
        if info.get("JobState") in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"):
            final_since = final_since or time.monotonic()
            if info.get("JobState") == "COMPLETED" or time.monotonic() - final_since > FINAL_STATE_HOLD_S:
                break
        else:
            final_since = None
        time.sleep(0.5)
    info = slurm_cluster.job(job)
    log = log_of(run_dir, job)
    assert info.get("JobState") == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) >= 1 and "USR1 received: saving at step" in log
    assert max(losses_by_step(run_dir)) == steps
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
