"""benchmarks/gpu_check.sh must fail loudly, not pass, where there is no CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_fails_with_a_clear_message_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device visible to PyTorch" in done.stderr
    assert not (tmp_path / "out").exists()  # stopped before doing anything
