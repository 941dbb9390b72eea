"""One live owner per run dir: a second owner is refused naming the first, the lock dies with its
owner, and a requeued SLURM attempt waits for its own job's earlier attempt instead of failing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from lmtrain.checkpoint.owner import OWNER_FILE, RunDirBusy, RunDirOwner, check_run_dir_free
from lmtrain_testing import wait_for

HOLD = ("import sys; from lmtrain.checkpoint.owner import RunDirOwner; owner = RunDirOwner(sys.argv[1]); "
        "print('held', flush=True); sys.stdin.readline(); owner.release()")


@pytest.fixture
def holder(tmp_path):
    """Another process that owns tmp_path/run as attempt 0 of SLURM job 77, until its stdin gets a line."""
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_another_owner_is_refused_naming_the_first(tmp_path, holder, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(RunDirBusy, match=rf"in use by another lmtrain train \(pid {holder.pid} on .*, SLURM job 77"):
        RunDirOwner(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=rf"pid {holder.pid}"):
        check_run_dir_free(tmp_path / "run")


def test_the_lock_dies_with_its_owner(tmp_path, holder, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder.kill()  # SIGKILL: no release, no cleanup
    holder.wait()
    check_run_dir_free(tmp_path / "run")
    owner = RunDirOwner(tmp_path / "run")
    assert f'"pid": {os.getpid()}' in (tmp_path / "run" / OWNER_FILE).read_text()
    owner.release()


def test_a_requeued_attempt_waits_for_its_jobs_earlier_attempt(tmp_path, holder, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunDirBusy):  # the wait is bounded
        RunDirOwner(tmp_path / "run", takeover_wait_s=0, log=lambda _: None)
    said, got = [], {}
    taker = threading.Thread(target=lambda: got.setdefault("owner", RunDirOwner(tmp_path / "run", log=said.append)))
    taker.start()
    wait_for(lambda: said, what="the requeued attempt to say it waits")
    assert "waiting for the previous attempt of this job" in said[0] and f"pid {holder.pid}" in said[0]
    holder.stdin.write("\n")  # the earlier attempt ends
    holder.stdin.flush()
    taker.join()
    assert '"slurm_restart_count": 1' in (tmp_path / "run" / OWNER_FILE).read_text()
    got["owner"].release()
