"""datatrove executors of a sharded prepare: local worker processes, or a SLURM job array.

Which tasks run is datatrove's: a task with a completion marker in the logging dir is skipped. A marker
whose input files are not whole on disk (the work dir was rebuilt, a shard was deleted) is removed
first, so a marker never hides missing shards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from lmtrain.data.config import PrepareExecutionConfig, PrepareExecutor
from lmtrain.data.sharded_inputs import InputFile
from lmtrain.data.sharded_step import record_problem

_SLURM_JOB_FILE = "slurm_job.json"
_SQUEUE_POLL_S = 2.0  # how often the launcher asks SLURM whether the array has left the queue


def build_executor(pipeline: list, execution: PrepareExecutionConfig, logging_dir: str, *, job_name: str):
    match execution.executor:
        case PrepareExecutor.local:
            workers = execution.workers or min(execution.tasks, os.cpu_count() or 1)
            return LocalPipelineExecutor(pipeline, tasks=execution.tasks, workers=min(workers, execution.tasks),
                                         logging_dir=logging_dir)
        case PrepareExecutor.slurm:
            activate = Path(sys.prefix) / "bin" / "activate"
            return _SlurmExecutor(
                pipeline, tasks=execution.tasks, time=execution.slurm_time, partition=execution.slurm_partition,
                cpus_per_task=execution.slurm_cpus_per_task, workers=execution.workers or -1, job_name=job_name,
                qos=execution.slurm_qos or "", venv_path=str(activate) if activate.is_file() else None,
                sbatch_args={"mem-per-cpu": execution.slurm_mem_per_cpu}, logging_dir=logging_dir,
            )
    raise ValueError(f"prepare.executor={execution.executor!r} does not run datatrove tasks; use local or slurm")


class _SlurmExecutor(SlurmPipelineExecutor):
    def launch_merge_stats(self):
        # datatrove also submits a job merging the tasks' stats, asking 1G per CPU, which a small cluster may
        # refuse outright; lmtrain's finishing step reads the shard records instead.
        pass


def run_executor(executor, execution: PrepareExecutionConfig, work: Path, plan: dict, log) -> bool:
    """Run (local) or submit and follow (slurm) the tasks not yet complete; True when every task has
    completed, False when a SLURM array was left running (prepare.slurm_wait=false)."""
    if execution.executor == PrepareExecutor.local:
        _forget_stale_completions(executor, work, plan, log)
        log(f"prepare: {execution.tasks} local task(s), {executor.workers} at a time; logs in {executor.logging_dir.path}")
        executor.run()
        return True
    job_file = work / _SLURM_JOB_FILE
    job = _earlier_job(job_file)
    if job is not None:
        log(f"prepare: SLURM job {job}, submitted by an earlier run, is still queued or running; following it")
    else:
        _forget_stale_completions(executor, work, plan, log)
        executor.run()  # submits an array of the incomplete tasks, or nothing when all are complete
        if executor.job_id in (None, -1):
            return True
        job = str(executor.job_id)
        job_file.write_text(json.dumps({"job_id": job}))
        log(f"prepare: submitted SLURM job array {job} ({execution.tasks} tasks); logs in {executor.logging_dir.path}")
    if not execution.slurm_wait:
        log("prepare: prepare.slurm_wait=false: not waiting; run the same command again once the array has ended "
            "to finish the dataset (it resubmits tasks that did not complete)")
        return False
    _wait_until_gone(job, log)
    job_file.unlink(missing_ok=True)
    incomplete = executor.get_incomplete_ranks(skip_completed=True)
    if incomplete:
        raise ValueError(f"{len(incomplete)} of {execution.tasks} tasks of SLURM job {job} did not complete (tasks "
                         f"{incomplete[:10]}); see {executor.logging_dir.path}/logs and slurm_logs; run the same command "
                         "again: it resubmits only those")
    return True


def _forget_stale_completions(executor, work: Path, plan: dict, log) -> None:
    inputs = [InputFile(**fields) for fields in plan["inputs"]]
    for rank in range(executor.world_size):
        if not executor.is_rank_completed(rank):
            continue
        if any(record_problem(work, source, plan) for source in inputs[rank::executor.world_size]):
            log(f"prepare: task {rank} is marked complete but its shards are not all whole; it runs again")
            executor.logging_dir.rm(f"completions/{rank:05d}")


def _earlier_job(job_file: Path) -> str | None:
    """The array an earlier (non-waiting or interrupted) run submitted, if SLURM still has it queued or running."""
    if not job_file.is_file():
        return None
    job = json.loads(job_file.read_text())["job_id"]
    return job if _queued_states(job) else None


def _queued_states(job: str) -> set[str]:
    """States of the job's array tasks still in the queue (pending, running, completing); empty once all ended."""
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    if proc.returncode != 0:  # "Invalid job id": it has left slurmctld's memory
        return set()
    return set(proc.stdout.split())


def _wait_until_gone(job: str, log) -> None:
    last: set[str] = set()
    while states := _queued_states(job):
        if states != last:
            log(f"prepare: SLURM job {job}: {', '.join(sorted(states))}")
            last = states
        time.sleep(_SQUEUE_POLL_S)
    log(f"prepare: SLURM job {job} has ended")
