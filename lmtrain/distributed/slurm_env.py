"""Start-up checks under SLURM: mismatches that otherwise hang silently end at once, with the fix."""

from __future__ import annotations

import os


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def check_slurm_environment(*, devices: int, num_nodes: int, env: dict | None = None) -> None:
    """Lightning's SLURM support needs one srun task per device, --ntasks-per-node == devices and
    --nodes == num_nodes (NOTES.md); anything else deadlocks in process-group set-up."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if ntasks > 1 and "SLURM_STEP_ID" not in env:
        raise ValueError(
            f"this job has {ntasks} SLURM tasks but lmtrain was started without srun (SLURM_STEP_ID is unset), which "
            "hangs in distributed set-up; start it as `srun lmtrain train ...` (slurm/train.sbatch does)"
        )
    if "SLURM_STEP_ID" not in env:
        return  # one task, no srun: a plain single-process run inside an allocation
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    if per_node is None and ntasks != devices * num_nodes:
        raise ValueError(
            f"SLURM started {ntasks} tasks (--ntasks without --ntasks-per-node) but trainer.devices={devices} x "
            f"trainer.num_nodes={num_nodes} = {devices * num_nodes}; submit with --nodes={num_nodes} "
            f"--ntasks-per-node={devices}"
        )
    if per_node is not None and int(per_node.split("(")[0]) != devices:
        raise ValueError(
            f"SLURM runs {per_node} tasks per node (--ntasks-per-node) but trainer.devices={devices}: one task per "
            f"device is required; set trainer.devices={per_node.split('(')[0]} or --ntasks-per-node={devices}"
        )
    if nodes != num_nodes:
        raise ValueError(
            f"the SLURM job has {nodes} nodes but trainer.num_nodes={num_nodes}; set trainer.num_nodes={nodes} "
            f"or submit with --nodes={num_nodes}"
        )
