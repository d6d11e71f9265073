"""benchmarks/gpu_check.sh: without a CUDA device it says so and succeeds."""

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_gpu_check_skips_without_cuda():
    completed = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "no CUDA device" in completed.stdout
