"""The local SLURM cluster itself: a two-node job step, and a requeued job that runs again."""

from __future__ import annotations

import pytest

from lmtrain_testing import wait_for

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
    state = slurm_cluster.wait(job, watch=[tmp_path])
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
        "sleep infinity\n",  # ends only by the requeue: the test cannot be too slow for it
        tmp_path,
    )

    def text() -> str:
        return out.read_text() if out.exists() else ""

    wait_for(lambda: "start restart=0" in text(), what=f"job {job} to start",
             progress=lambda: slurm_cluster.state(job))
    slurm_cluster.run("scontrol", "requeue", job)

    def restarted() -> bool:
        slurm_cluster.release_requeued(job)
        return "start restart=1" in text()

    wait_for(restarted, what=f"job {job} to run again", progress=lambda: (slurm_cluster.state(job), text()), poll_s=0.5)
    assert slurm_cluster.wait(job, watch=[out]) == "COMPLETED", out.read_text()
    # slurmstepd also appends "*** JOB <id> ON n1 CANCELLED AT ... DUE TO JOB REQUEUE ***" to the output.
    final = out.read_text()
    assert "DUE TO JOB REQUEUE" in final, final
    assert [line for line in final.splitlines() if "slurmstepd" not in line] == ["start restart=0", "start restart=1", "done"]
    assert slurm_cluster.job(job)["Restarts"] == "1"
