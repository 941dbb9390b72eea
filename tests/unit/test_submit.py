"""`lmtrain submit` without a cluster: the checks it runs before sbatch and the script it renders."""

from __future__ import annotations

import pytest

from lmtrain_testing import compose
from lmtrain.config import to_typed
from lmtrain.submit import render, resolve_layout, time_limit_s


def submit_cfg(*overrides):
    return to_typed(compose("submit", list(overrides)))


@pytest.mark.parametrize("spec,seconds", [("30", 1800), ("10:00", 600), ("1:00:00", 3600), ("2-00:00:00", 172800),
                                          ("1-12", 129600)])
def test_slurm_time_formats(spec, seconds):
    assert time_limit_s(spec) == seconds


def test_layout_adopts_slurm_counts_and_refuses_a_mismatch():
    cfg = submit_cfg("slurm.nodes=4", "slurm.gpus_per_node=8", "model=gpt2_124m", "trainer.seq_len=1024")
    assert resolve_layout(cfg) == (4, 8) and cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 4
    with pytest.raises(ValueError, match="slurm.gpus_per_node=8 tasks per node but trainer.devices=4"):
        resolve_layout(submit_cfg("slurm.gpus_per_node=8", "trainer.devices=4"))
    with pytest.raises(ValueError, match=r"global_batch_size=24 is not a multiple"):
        resolve_layout(submit_cfg("slurm.gpus_per_node=8", "trainer.global_batch_size=24", "trainer.micro_batch_size=2"))


def test_rendered_script_has_the_requeue_contract(tmp_path):
    cfg = submit_cfg("cluster=example_gpu_site", "slurm.nodes=2", "slurm.time=4:00:00", "model=gpt2_124m",
                     "trainer.seq_len=1024")
    resolve_layout(cfg)
    script = render(cfg, tmp_path / "runs" / "r", ["model=gpt2_124m", "optim.lr=6e-4"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@180", "#SBATCH --open-mode=append", "#SBATCH --partition=gpu",
                 "#SBATCH --exclusive", "module load cuda/12.4", "srun --kill-on-bad-exit=1", "optim.lr=6e-4",
                 "run_name=r", "trainer.devices=8", "trainer.num_nodes=2"):
        assert line in script, line
    assert "--signal=B:" not in script  # B: would signal only the batch shell


def test_bad_cluster_settings_are_named():
    with pytest.raises(ValueError, match="cluster.signal='KILL'"):
        submit_cfg("cluster.signal=KILL")
    with pytest.raises(ValueError, match="cluster.grace_s=5"):
        submit_cfg("cluster.grace_s=5")
