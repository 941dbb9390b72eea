"""The local SLURM cluster itself: a two-node job step, and a requeued job that runs again."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slurm


def test_two_node_job_runs_one_task_per_node(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2\n"
        "#SBATCH --ntasks-per-node=1\n"
        "#SBATCH --time=2\n"
        "#SBATCH --output=two-nodes-%j.out\n"
        "srun bash -c 'echo task $SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS'\n",
        tmp_path,
    )
    state = slurm_cluster.wait(job, timeout_s=30)
    output = (tmp_path / f"two-nodes-{job}.out").read_text()
    assert state == "COMPLETED", output
    tasks = sorted(tuple(line.split()[1:]) for line in output.splitlines() if line.startswith("task "))
    assert tasks == [("n1", "0", "2"), ("n2", "1", "2")], output


def test_requeued_job_runs_again_with_restart_count(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.out"
    job = slurm_cluster.sbatch(
        "#!/bin/bash\n"
        "#SBATCH --nodes=1\n"
        "#SBATCH --ntasks=1\n"
        "#SBATCH --time=2\n"
        "#SBATCH --requeue\n"
        "#SBATCH --open-mode=append\n"
        f"#SBATCH --output={out}\n"
        'echo "start restart=${SLURM_RESTART_COUNT:-0}"\n'
        'if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then echo done; exit 0; fi\n'
        "sleep 120\n",
        tmp_path,
    )
    deadline = time.monotonic() + 20
    while "start restart=0" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, f"job {job} never started: {slurm_cluster.job(job)}"
        time.sleep(0.25)

    slurm_cluster.run("scontrol", "requeue", job)
    # A requeued job waits ~120 s (BeginTime) before it may start again: release it once it is pending.
    deadline = time.monotonic() + 30
    while "start restart=1" not in out.read_text():
        assert time.monotonic() < deadline, f"job {job} did not run again: {slurm_cluster.job(job)}\n{out.read_text()}"
        if slurm_cluster.state(job) == "PENDING":
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        time.sleep(0.5)

    assert slurm_cluster.wait(job, timeout_s=20) == "COMPLETED", out.read_text()
    # slurmstepd also appends "*** JOB <id> ON n1 CANCELLED AT ... DUE TO JOB REQUEUE ***" to the output.
    text = out.read_text()
    assert "DUE TO JOB REQUEUE" in text, text
    assert [line for line in text.splitlines() if "slurmstepd" not in line] == ["start restart=0", "start restart=1", "done"]
    assert slurm_cluster.job(job)["Restarts"] == "1"
