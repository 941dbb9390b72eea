"""lmtrain on the local two-node SLURM cluster: `lmtrain submit` of a real 2-node DDP job,
preemption (signal -> step finished -> checkpoint -> requeue -> resume, bitwise), a refused
submission, and a job whose rank dies."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from lmtrain_testing import TINY_TRAIN, losses_by_step, run_cli, tree_signature, wait_for
from lmtrain.checkpoint import resolve_checkpoint

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


def follow_to_completion(cluster, job: str, run_dir: Path) -> str:
    """Wait until the job is COMPLETED, starting each requeued attempt at once (SLURM holds it back
    ~120 s otherwise). Gives up only when the job and its run dir stop changing (a failed job)."""

    def completed() -> bool:
        cluster.release_requeued(job)
        return cluster.state(job) == "COMPLETED"

    try:
        wait_for(completed, what=f"job {job} to complete", poll_s=0.5,
                 progress=lambda: (cluster.job(job).get("JobState"), tree_signature([run_dir])))
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log_of(run_dir, job)[-5000:]}") from None
    return "COMPLETED"


def log_of(run_dir: Path, job: str) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def test_two_node_job_trains_with_one_rank_per_node(slurm_cluster, prepared, tmp_path):
    job, run_dir = submit(slurm_cluster, prepared, tmp_path, "trainer.max_steps=6", "run_name=two_nodes")
    state = slurm_cluster.wait(job, watch=[run_dir])
    log = log_of(run_dir, job)
    assert state == "COMPLETED", log[-4000:]
    assert "2 ranks" in log and "n[1-2]" in log
    assert sorted(losses_by_step(run_dir)) == list(range(1, 7))
    assert (run_dir / "submit.sbatch").is_file() and (run_dir / "checkpoints" / "last.ckpt").exists()


def test_preemption_requeues_and_resumes_exactly(slurm_cluster, prepared, tmp_path):
    steps = 40
    ref_job, ref_dir = submit(slurm_cluster, prepared, tmp_path, f"trainer.max_steps={steps}", "run_name=ref")
    assert slurm_cluster.wait(ref_job, watch=[ref_dir]) == "COMPLETED", log_of(ref_dir, ref_job)[-4000:]

    # The first attempt stops after step 5 until the signal comes: the preemption lands mid-run by construction.
    job, run_dir = submit(slurm_cluster, prepared, tmp_path, f"trainer.max_steps={steps}", "run_name=preempted",
                          "trainer.ckpt_every_steps=1000", "logger=wandb", "logger.mode=offline",
                          env={"LMTRAIN_FAULT": "hold:5"})
    wait_for(lambda: "holding after step 5" in log_of(run_dir, job), what="the job to reach step 5",
             progress=lambda: (slurm_cluster.state(job), tree_signature([run_dir])))
    slurm_cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@grace or a preempting scheduler sends
    follow_to_completion(slurm_cluster, job, run_dir)
    log = log_of(run_dir, job)
    assert slurm_cluster.job(job).get("Restarts") == "1"
    # 2 ranks agree on the signal one step after it arrived (no blocking collective per step)
    assert re.search(r"USR1 received: saving at step [56],", log) and "requeued job" in log and "resuming from" in log
    ref, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    assert [got[s] for s in range(1, steps + 1)] == [ref[s] for s in range(1, steps + 1)]  # bitwise
    assert_one_wandb_run(run_dir, attempts=2)


def assert_one_wandb_run(run_dir: Path, attempts: int) -> None:
    """Offline W&B writes one directory per attempt; every attempt must continue one run id."""
    dirs = list((run_dir / "wandb").glob("offline-run-*"))
    ids = {p.name.rsplit("-", 1)[1] for p in dirs}
    assert len(ids) == 1 and len(dirs) == attempts, sorted(p.name for p in dirs)


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
    state = slurm_cluster.wait(job, watch=[run_dir])
    assert state == "FAILED", log_of(run_dir, job)[-4000:]
    assert slurm_cluster.job(job).get("Restarts", "0") == "0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(resolve_checkpoint(last), weights_only=True)["global_step"] == 4


def test_sweep_runs_its_trials_as_slurm_jobs(slurm_cluster, prepared, tmp_path):
    overrides = [*prepared, *TINY_TRAIN, "trainer.max_steps=8", "trainer.val_every_steps=4", "trainer.accelerator=cpu"]
    submit = [f"cluster.command={sys.executable} -m lmtrain", "slurm.nodes=1", "slurm.gpus_per_node=1", "slurm.time=10:00"]
    out = run_cli(["sweep", "sweep.name=sl", "sweep.n_trials=2", "sweep.pruner=none", f"sweep.sweeps_dir={tmp_path}",
                   "sweep.params=['optim.lr: loguniform(1e-3, 1e-2)']", "launcher=slurm", "launcher.parallel=2",
                   "launcher.poll_s=1", "sweep.overrides=[" + ",".join(f"'{o}'" for o in overrides) + "]",
                   "launcher.submit_overrides=[" + ",".join(f"'{o}'" for o in submit) + "]"],
                  cwd=tmp_path, env=slurm_cluster.env, watch=[tmp_path / "sl"]).stdout
    runs = tmp_path / "sl" / "runs"
    for n in (0, 1):
        assert list((runs / f"trial-{n}").glob("slurm-*.out")), f"trial {n} did not run as a SLURM job"
        assert sorted(losses_by_step(runs / f"trial-{n}")) == list(range(1, 9))
    assert "best: trial" in out


def test_time_limit_signal_requeues_and_the_job_completes(slurm_cluster, prepared, tmp_path):
    """SLURM's own time-limit signal (slurm.time=2:00, cluster.grace_s=60: USR1 about 60 s in, or up to a
    periodic check earlier, and never in the first second of a task, before its handler exists) reaches
    every task; the attempt saves at a step boundary, requeues, and the next attempt resumes in the
    same run dir and W&B run and completes. The first attempt holds after step 5 until the signal,
    so it cannot finish before it, however fast this machine is; nothing in the test sends it."""
    steps = 30
    job, run_dir = submit(slurm_cluster, prepared, tmp_path, f"trainer.max_steps={steps}", "run_name=limited",
                          "slurm.time=2:00", "cluster.grace_s=60", "trainer.ckpt_every_steps=100000",
                          "logger=wandb", "logger.mode=offline", env={"LMTRAIN_FAULT": "hold:5"})
    follow_to_completion(slurm_cluster, job, run_dir)
    info, log = slurm_cluster.job(job), log_of(run_dir, job)
    restarts = int(info["Restarts"])
    assert restarts >= 1 and log.count("USR1 received: saving at step") == restarts, log[-4000:]
    assert log.count("resuming from") == restarts
    assert sorted(losses_by_step(run_dir)) == list(range(1, steps + 1))
    assert torch.load(resolve_checkpoint(run_dir / "checkpoints" / "last.ckpt"), weights_only=True)["global_step"] == steps
    assert_one_wandb_run(run_dir, attempts=restarts + 1)


def test_a_second_job_on_a_live_run_dir_is_refused(slurm_cluster, prepared, tmp_path):
    """Two jobs, one run dir: `lmtrain submit` refuses the second before it queues, and the same
    script submitted by hand fails at start naming the first job, leaving the first run alone."""
    first, run_dir = submit(slurm_cluster, prepared, tmp_path, "trainer.max_steps=8", "trainer.ckpt_every_steps=2",
                            "run_name=owned", env={"LMTRAIN_FAULT": "hold:3"})
    wait_for(lambda: "holding after step 3" in log_of(run_dir, first), what="the first job to reach step 3",
             progress=lambda: (slurm_cluster.state(first), tree_signature([run_dir])))
    script = (run_dir / "submit.sbatch").read_bytes()
    refused = run_cli(["submit", *prepared, *TINY_TRAIN, *TRAIN, f"runs_dir={tmp_path / 'runs'}", "run_name=owned"],
                      cwd=tmp_path, env=slurm_cluster.env, check=False)
    assert refused.returncode == 2 and f"SLURM job {first}" in refused.stderr, refused.stderr[-2000:]
    assert (run_dir / "submit.sbatch").read_bytes() == script

    second = slurm_cluster.run("sbatch", "--parsable", str(run_dir / "submit.sbatch")).stdout.strip().split(";")[0]
    assert slurm_cluster.wait(second, watch=[run_dir]) == "FAILED", log_of(run_dir, second)[-3000:]
    assert "is in use by another lmtrain train (pid" in log_of(run_dir, second) and f"SLURM job {first}" in log_of(run_dir, second)
    assert slurm_cluster.state(first) == "RUNNING"  # the first job goes on
    slurm_cluster.run("scancel", first)
    assert slurm_cluster.wait(first, watch=[run_dir]) in ("CANCELLED", "FAILED", "COMPLETED")
    # Only the first job ever trained here: held at step 3, SIGTERM, saved one step later at most.
    assert sorted(losses_by_step(run_dir)) in ([1, 2, 3], [1, 2, 3, 4])
