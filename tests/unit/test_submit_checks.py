"""`lmtrain submit` refuses a cluster or SLURM setting it cannot run, with one line, before anything is
written or submitted; a good one still passes and renders. No SLURM cluster is needed (--dry-run)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lmtrain_testing import TINY_TRAIN, compose
from lmtrain.config import to_typed
from lmtrain.submit import SlurmConfig, preflight, render, resolve_layout, time_limit_s


def submit_cfg(*overrides):
    return to_typed(compose("submit", list(overrides)))


@pytest.mark.parametrize("override,message", [
    ("slurm.nodes=-1", "slurm.nodes=-1 must be >= 1"),
    ("slurm.nodes=100000", "slurm.nodes=100000 is more than cluster.max_nodes=128 of cluster local"),
    ("slurm.time=24h", "slurm.time='24h' is not a SLURM time limit"),
    ("slurm.time=2:00", "cluster.grace_s=120 is not shorter than slurm.time=2:00 (120 s)"),
])
def test_dry_run_refuses_with_one_line_naming_the_value(override, message, prepared, tmp_path, cli):
    proc = cli(["submit", "--dry-run", *prepared, *TINY_TRAIN, f"runs_dir={tmp_path / 'runs'}", "run_name=r", override],
               tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmtrain: error: ") and message in lines[0], proc.stderr
    assert "checks passed" not in proc.stdout and not (tmp_path / "runs").exists()


def test_dry_run_of_a_good_config_passes_and_renders(prepared, tmp_path, cli):
    proc = cli(["submit", "--dry-run", *prepared, *TINY_TRAIN, f"runs_dir={tmp_path / 'runs'}", "run_name=good",
                "slurm.nodes=2", "slurm.gpus_per_node=2", "slurm.time=1-00:00"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checks passed" in proc.stdout and "world size 4, global batch 16 (accumulation 1)" in proc.stdout
    script = (tmp_path / "runs" / "good" / "submit.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=1-00:00", "trainer.num_nodes=2"):
        assert line in script, line


@pytest.mark.parametrize("overrides,message", [
    (["slurm.nodes=0"], "slurm.nodes=0 must be >= 1"),
    (["trainer.num_nodes=500"], "trainer.num_nodes=500 is more than cluster.max_nodes=128"),
    (["cluster=example_gpu_site", "slurm.nodes=17"], "slurm.nodes=17 is more than cluster.max_nodes=16"),
    (["slurm.gpus_per_node=0"], "slurm.gpus_per_node=0 must be >= 1"),
    (["slurm.gpus_per_node=100000"], "slurm.gpus_per_node=100000 tasks per node is more than cluster.max_tasks_per_node"),
    (["cluster=example_gpu_site", "slurm.gpus_per_node=16"], "nodes have 8 GPUs (cluster.gpus_per_node); use at most 8"),
    (["cluster=example_gpu_site", "trainer.devices=16"], "trainer.devices=16 tasks per node, but cluster"),
    (["cluster.gpus_per_node=-1"], "cluster.gpus_per_node=-1 must be >= 0"),
    (["cluster.gpus_per_node=1000"], "cluster.gpus_per_node=1000 is more than cluster.max_tasks_per_node=128"),
    (["cluster.cpus_per_task=0"], "cluster.cpus_per_task=0 must be >= 1"),
    (["cluster.max_nodes=0"], "cluster.max_nodes=0 must be >= 1"),
    (["cluster.max_requeues=-1"], "cluster.max_requeues=-1 must be >= 0"),
    (["cluster.mem_per_task=64"], "cluster.mem_per_task='64' is not a memory size with a unit (K, M, G or T, e.g. 64G); "
                                  "did you mean 64G?"),
    (["cluster.mem_per_task=0G"], "cluster.mem_per_task='0G' must be > 0"),
    (["cluster.mem_per_task=lots"], "cluster.mem_per_task='lots' is not a memory size"),
    (["cluster.partition='gpu a100'"], "cluster.partition='gpu a100' is not a SLURM partition name"),
    (["cluster.command=''"], "cluster.command='' is empty"),
    (["cluster.runs_dir=''"], "cluster.runs_dir='' is empty"),
    (["cluster.name=''"], "cluster.name='' is empty"),
    (["cluster.extra_sbatch=['--nodes=9']"], "entry '--nodes=9' sets --nodes, which lmtrain writes itself"),
    (["cluster.extra_sbatch=['-t 5']"], "entry '-t 5' sets -t, which lmtrain writes itself"),
    (["cluster.extra_sbatch=[hostname]"], "entry 'hostname' is not an sbatch option"),
    (["slurm.job_name='my job'"], "slurm.job_name='my job' must be a non-empty word"),
    (["slurm.time=2"], "cluster.grace_s=120 is not shorter than slurm.time=2 (120 s)"),
    (["cluster=example_gpu_site", "slurm.time=3:00"], "cluster.grace_s=180 is not shorter than slurm.time=3:00"),
])
def test_bad_settings_are_refused_naming_key_and_value(overrides, message):
    with pytest.raises(ValueError) as info:
        submit_cfg(*overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("spec,message", [
    ("24h", "is not a SLURM time limit"), ("1:2:3:4", "is not a SLURM time limit"), ("-1", "is not a SLURM time limit"),
    ("1-", "is not a SLURM time limit"), ("", "is not a SLURM time limit"), ("1- 2", "is not a SLURM time limit"),
    ("UNLIMITED", "is not a SLURM time limit"), ("1:75:00", "has 75 minutes, which must be < 60"),
    ("10:60", "has 60 seconds, which must be < 60"), ("1-24", "has 24 hours, which must be < 24"),
    ("0", "is no time limit"), ("0-00:00:00", "is no time limit"),
    ("86400", "is 86400 minutes (60.0 days); write a limit over a day as D-HH:MM:SS"),
])
def test_bad_time_limits_are_named(spec, message):
    with pytest.raises(ValueError) as info:
        time_limit_s(spec)
    assert str(info.value).startswith(f"slurm.time={spec!r} ") and message in str(info.value)


@pytest.mark.parametrize("spec,seconds", [("1440", 86400), ("10:30", 630), ("48:00:00", 172800), ("1-12:30", 131400),
                                          ("1-12:30:15", 131415), ("0:00:45", 45)])
def test_more_slurm_time_formats(spec, seconds):
    assert time_limit_s(spec) == seconds


def test_an_unquoted_yaml_time_is_caught():
    """YAML 1.1 reads `time: 24:00:00` as the number 86400; SLURM would take that as 60 days of minutes."""
    cfg = OmegaConf.merge(OmegaConf.structured(SlurmConfig), OmegaConf.create("time: 24:00:00"))
    with pytest.raises(ValueError, match="quote times in YAML files"):
        OmegaConf.to_object(cfg)
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SlurmConfig),
                                               OmegaConf.create("time: '24:00:00'"))).time == "24:00:00"


def test_site_layout_and_memory_render(prepared, tmp_path):
    """example_gpu_site: 16 nodes allowed, 8 tasks per node by default, and mem_per_task is per task."""
    cfg = submit_cfg(*prepared, *TINY_TRAIN, "cluster=example_gpu_site", "slurm.nodes=16", "slurm.time=30",
                     f"cluster.runs_dir={tmp_path / 'runs'}")
    report = preflight(cfg, tmp_path / "runs" / "r")
    assert report[0] == "layout: 16 node(s) x 8 task(s) = world size 128, global batch 512 (accumulation 1)"
    script = render(cfg, tmp_path / "runs" / "r", [])
    assert "#SBATCH --mem=80G\n" in script and "--mem-per-cpu" not in script and "#SBATCH --time=30\n" in script


def test_layout_is_unchanged_by_a_second_resolve():
    cfg = submit_cfg("cluster=example_gpu_site", "slurm.nodes=2")
    assert resolve_layout(cfg) == (2, 8) == resolve_layout(cfg)
    assert cfg.trainer.world_size == 16
    assert cfg.trainer.resolved_global_batch_size() == 16 * cfg.trainer.micro_batch_size > 0
