"""Start-up checks under SLURM: every mismatch that would hang ends at once, naming the fix."""

from __future__ import annotations

import pytest

from lmtrain.distributed.slurm_env import check_slurm_environment

JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "lm", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
       "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NUM_NODES": "2"}


def test_a_matching_job_passes_and_no_job_is_not_checked():
    check_slurm_environment(devices=2, num_nodes=2, env=JOB)
    check_slurm_environment(devices=8, num_nodes=3, env={})
    check_slurm_environment(devices=8, num_nodes=3, env={**JOB, "SLURM_JOB_NAME": "bash"})  # salloc shell


def test_python_under_sbatch_without_srun_is_refused():
    env = {k: v for k, v in JOB.items() if k != "SLURM_STEP_ID"}
    with pytest.raises(ValueError, match=r"4 SLURM tasks but lmtrain was started without srun.*srun lmtrain train"):
        check_slurm_environment(devices=2, num_nodes=2, env=env)


def test_tasks_per_node_must_equal_devices():
    with pytest.raises(ValueError, match=r"2 tasks per node .* but trainer.devices=4"):
        check_slurm_environment(devices=4, num_nodes=2, env=JOB)


def test_nodes_must_equal_num_nodes():
    with pytest.raises(ValueError, match=r"2 nodes but trainer.num_nodes=1"):
        check_slurm_environment(devices=2, num_nodes=1, env=JOB)


def test_ntasks_without_a_per_node_count_must_match_the_world():
    env = {k: v for k, v in JOB.items() if k != "SLURM_NTASKS_PER_NODE"}
    with pytest.raises(ValueError, match=r"4 tasks \(--ntasks without --ntasks-per-node\).*= 2"):
        check_slurm_environment(devices=1, num_nodes=2, env=env)
