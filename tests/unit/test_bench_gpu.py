"""bench/bench_gpu.py imports cleanly and, without CUDA, says it skipped; the benchmarks' wait
for a server gives up when the server process has exited."""

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


def test_waiting_for_a_server_that_exited_fails_at_once():
    """A refused start-up ends the wait (with its status) instead of the whole timeout."""
    sys.path.insert(0, str(BENCH.parent))
    from bench_server import free_port, wait_serving

    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait(60)
    with pytest.raises(RuntimeError, match="exited with status 3 before serving"):
        wait_serving(f"127.0.0.1:{free_port()}", timeout=600, process=process)
