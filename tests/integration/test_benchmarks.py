"""Every benchmark still runs: each script at its smallest size prints the ratio it exists for
(the figures themselves are measured by hand, side by side, never asserted)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from lmtrain_testing import CHILD_ENV, REPO, communicate, write_corpus

pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str, cwd) -> str:
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd,
                            env={**os.environ, **CHILD_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = communicate(proc, what=f"benchmarks/{script}")
    assert proc.returncode == 0, out[-3000:]
    return out


def test_throughput_benchmark_prints_its_ratios(tmp_path):
    out = run_benchmark("throughput.py", "--models", "tiny", "--attention-models", "tiny", "--steps", "2", "--repeats", "1",
                        "--warmup-steps", "1", "--threads", "1", "--device", "cpu", "--tokens", "50000", "--val-tokens",
                        "4096", cwd=tmp_path)
    assert re.search(r"^tiny\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+\d\.\d{3}\s", out, re.M), out[-2000:]
    assert "max |parameter difference| between the sides after training: 0" in out
    # causal against document masking: documents per window, both tok/s, their ratio
    assert re.search(r"^tiny\s+\d+\.\d{2}\s+[\d,]+\s+[\d,]+\s+\d+\.\d{3}$", out.split("docs/window", 1)[-1], re.M), out[-2000:]


def assert_throughput_row(out: str, name: str) -> None:
    """The case's row of the throughput table (params, plain tok/s, lmtrain tok/s, ratio, verdict), its
    ratio a positive finite number, and both sides' weights equal after training (the same work)."""
    row = re.search(rf"^{re.escape(name)}\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+(\S+)\s+(?:PASS|BELOW)$", out, re.M)
    assert row, out[-3000:]
    ratio = float(row.group(1))
    assert math.isfinite(ratio) and ratio > 0, row.group(0)
    assert re.search(rf"^  {re.escape(name)}\s+max \|parameter difference\| between the sides after training: 0$", out, re.M), out[-2000:]


# The cases beyond the default run, each at --smoke size (toy models, 1 warmup step, 1 segment of 2 steps).
@pytest.mark.parametrize("case, row", [
    (["--ddp-models", "tiny"], "tiny/ddp2"),  # 2 ranks started by the benchmark, DDP over gloo on both sides
    (["--accumulate-models", "tiny"], "tiny/acc4"),
    (["--models", "gpt2_124m"], "gpt2_124m"),  # the preset's kinds of layers and its vocabulary, at toy width
], ids=["ddp", "accumulate", "gpt2_124m"])
def test_throughput_benchmark_cases_print_their_ratios(tmp_path, case, row):
    out = run_benchmark("throughput.py", "--smoke", "--device", "cpu", *case, cwd=tmp_path)
    assert_throughput_row(out, row)
    assert "docs/window" not in out  # naming a case runs that case only


def test_prepare_benchmark_prints_its_ratio(tmp_path):
    corpus = write_corpus(tmp_path / "text")
    out = run_benchmark("prepare.py", "--paths", str(corpus), "--vocab-size", "300", cwd=tmp_path)
    assert re.search(r"per core: [\d.]+ MB/s; all \d+ cores: [\d.]+ MB/s; ratio [\d.]+x", out), out[-2000:]


def test_loss_memory_benchmark_prints_its_ratio(tmp_path):
    out = run_benchmark("loss_memory.py", "--vocab", "5000", "--d-model", "64", "--tokens", "2048", "--chunk", "256",
                        cwd=tmp_path)
    assert re.search(r"plain \d+ MB \| chunked \(256 tokens\) \d+ MB \| ratio chunked/plain [\d.]+ \| loss diff", out), out
