"""The local two-node SLURM cluster (launch/local_slurm.sh) as a session fixture.

`slurm_cluster` brings the cluster up (installing slurm-wlm and munge if missing), puts SLURM_CONF
in os.environ for the session, and tears the cluster down at the end, unless it was already up
before the session or LMTRAIN_SLURM_KEEP=1 (then it is left as found). Tests are skipped when not
root or when the packages cannot be installed; any other failure to start the cluster fails them.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmtrain_testing import STALL_S, tree_signature, wait_for

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "local_slurm.sh"
SLURM_DIR = Path(os.environ.get("LMTRAIN_SLURM_DIR", "/tmp/lmtrain-slurm"))

# Exit codes of launch/local_slurm.sh that mean "this machine cannot have the cluster".
CANNOT_INSTALL, NOT_ROOT = 3, 4

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"})


def _script(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout)


@dataclass
class SlurmCluster:
    """Handle on the running cluster: its environment and small helpers around the SLURM commands."""

    env: dict[str, str]
    nodes: tuple[str, ...] = ("n1", "n2")
    partition: str = "debug"
    _scripts: int = field(default=0, repr=False)
    _pending_since: dict = field(default_factory=dict, repr=False)

    def run(self, *args: str, check: bool = True, timeout: float = STALL_S) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, script_text: str, cwd: Path, *args: str) -> str:
        """Submit `script_text` (a batch script; #SBATCH lines allowed) from `cwd`; returns the job id.
        The job inherits this environment and runs in `cwd`; output goes to cwd/slurm-<id>.out unless
        the script says --output."""
        cwd = Path(cwd)
        self._scripts += 1
        path = cwd / f"job{self._scripts}.sbatch"
        path.write_text(script_text if script_text.startswith("#!") else "#!/bin/bash\n" + script_text)
        out = self.run("sbatch", "--parsable", f"--chdir={cwd}", *args, str(path)).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ...); {} once the job is gone."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout.splitlines()[0]))

    def state(self, job_id: str) -> str | None:
        info = self.job(job_id)
        if info:
            return info.get("JobState")
        # Gone from slurmctld (after MinJobAge): ask accounting, where there is any.
        proc = self.run("sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id), check=False)
        lines = proc.stdout.split() if proc.returncode == 0 else []
        return lines[0].split()[0] if lines else None

    def wait(self, job_id: str, *, states: frozenset[str] | set[str] = FINAL_STATES, watch=(),
             stall_s: float = STALL_S) -> str:
        """Poll until the job reaches one of `states` (default: any final state); return that state.
        Gives up only when neither the job's state nor any file under `watch` has changed for stall_s."""
        seen: dict[str, str | None] = {}

        def reached() -> str | None:
            seen["state"] = self.state(job_id)
            return seen["state"] if seen["state"] in states else None

        try:
            return wait_for(reached, what=f"job {job_id} to reach {sorted(states)}", stall_s=stall_s, poll_s=0.25,
                            progress=lambda: (seen.get("state"), tree_signature(watch)))
        except AssertionError as e:
            raise AssertionError(f"{e}; it is {seen.get('state')}:\n"
                                 f"{self.run('scontrol', 'show', 'job', str(job_id), check=False).stdout}") from None

    def release_requeued(self, job_id: str) -> None:
        """A requeued job waits ~120 s (BeginTime) once PENDING again; let it start now. The update
        takes only while the job is PENDING (not during REQUEUED/COMPLETING), so call this while polling.

        Not in the second its previous run's credential was revoked: slurmd compares credential times
        in whole seconds, and a restart within that second is killed ("Job credential revoked", seen
        here once). So the release waits until the job has been seen PENDING in an earlier second."""
        info = self.job(job_id)
        if info.get("JobState") != "PENDING" or int(info.get("Restarts", "0")) == 0:
            return
        key = (job_id, info.get("Restarts"))
        first_seen = self._pending_since.setdefault(key, int(time.time()))
        if int(time.time()) > first_seen + 1:
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages and runs slurmd as root)")
    was_up = _script("status", 30).returncode == 0
    proc = _script("up", 600)
    if proc.returncode in (CANNOT_INSTALL, NOT_ROOT):
        reason = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        pytest.skip(f"local SLURM cluster unavailable: {reason}")
    if proc.returncode != 0:
        pytest.fail(f"launch/local_slurm.sh up exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                    f"\n--- stderr\n{proc.stderr[-6000:]}", pytrace=False)
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout)
    assert conf, f"`up` printed no SLURM_CONF line:\n{proc.stdout}"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf.group(1)
    try:
        yield SlurmCluster(env=dict(os.environ))
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if not was_up and os.environ.get("LMTRAIN_SLURM_KEEP") != "1":
            down = _script("down", 120)
            assert down.returncode == 0, f"launch/local_slurm.sh down exited {down.returncode}\n{down.stderr}"
