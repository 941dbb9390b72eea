"""Every benchmark still runs: each script at its smallest size prints the ratio it exists for
(the figures themselves are measured by hand, side by side, never asserted)."""

from __future__ import annotations

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


def test_prepare_benchmark_prints_its_ratio(tmp_path):
    corpus = write_corpus(tmp_path / "text")
    out = run_benchmark("prepare.py", "--paths", str(corpus), "--vocab-size", "300", cwd=tmp_path)
    assert re.search(r"per core: [\d.]+ MB/s; all \d+ cores: [\d.]+ MB/s; ratio [\d.]+x", out), out[-2000:]


def test_loss_memory_benchmark_prints_its_ratio(tmp_path):
    out = run_benchmark("loss_memory.py", "--vocab", "5000", "--d-model", "64", "--tokens", "2048", "--chunk", "256",
                        cwd=tmp_path)
    assert re.search(r"plain \d+ MB \| chunked \(256 tokens\) \d+ MB \| ratio chunked/plain [\d.]+ \| loss diff", out), out
