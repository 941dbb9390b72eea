"""lmtrain.model stays plain PyTorch: importing it loads no training framework."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "deepspeed")


def test_model_package_imports_no_framework():
    code = (
        "import sys, lmtrain.model\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"lmtrain.model imported {result.stdout.strip()}"
