"""`lmtrain prepare prepare.executor=slurm`: the datatrove tasks as a job array on the local two-node cluster
write, token for token, what local tasks write."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("datatrove")

from lmtrain_testing import (  # noqa: E402 - after the skip
    meta_without_time, prepare_sharded_in_process, run_cli, sharded_overrides, tokens_of, write_jsonl_corpus)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]


def test_job_array_writes_what_local_tasks_write(slurm_cluster, tmp_path):
    corpus = write_jsonl_corpus(tmp_path / "jsonl", n_files=4, docs_per_file=100, seed=3)
    local = prepare_sharded_in_process(sharded_overrides(corpus, tmp_path / "local", "prepare.executor=local", "prepare.tasks=1"))

    args = ["prepare", *sharded_overrides(corpus, tmp_path / "slurm", "prepare.executor=slurm", "prepare.tasks=3",
                                  f"prepare.slurm_partition={slurm_cluster.partition}",
                                  "prepare.slurm_mem_per_cpu=200M", "prepare.slurm_time=10:00")]
    proc = run_cli(args, cwd=tmp_path, env=slurm_cluster.env, watch=[tmp_path / "slurm"])
    job = proc.stdout.split("submitted SLURM job array ")[1].split()[0]
    assert slurm_cluster.state(job) == "COMPLETED", proc.stdout[-3000:]
    done = tmp_path / "slurm" / local.name
    assert f"prepared: {done}" in proc.stdout
    logs = done / "logs" / "tasks-3"
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001", "00002"]
    assert len(list((logs / "slurm_logs").glob(f"{job}_*.out"))) == 3  # three array tasks ran
    for mine, reference in zip(tokens_of(done), tokens_of(local)):
        assert len(reference) > 1000 and np.array_equal(mine, reference)
    assert meta_without_time(done) == meta_without_time(local)

    again = run_cli(args, cwd=tmp_path, env=slurm_cluster.env)  # a finished dataset: nothing is submitted
    assert "already prepared" in again.stdout and "submitted" not in again.stdout
