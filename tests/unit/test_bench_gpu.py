"""bench/bench_gpu.py imports cleanly and, without CUDA, says it skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmark really runs")
def test_bench_gpu_skips_without_cuda():
    result = subprocess.run(
        [sys.executable, str(BENCH)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "skipped: no CUDA device"


def test_bench_gpu_parses_its_options():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "--workers" in result.stdout
