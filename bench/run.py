"""`make bench`: every benchmark, each printing ratios measured within its own run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = [
    ["bench_model.py"],
    ["bench_detect.py"],
    ["bench_server.py"],
    ["bench_http.py"],
    ["bench_hardware.py"],
    ["bench_decode.py"],
    ["bench_gpu.py"],
    ["bench_triton.py"],
    ["bench_gallery.py"],
    # Full size rebuilds 1M vectors from each store (~10 GB of disk, several minutes).
    ["bench_shared.py"],
    ["bench_sampling.py"],
]


def main() -> int:
    failed = 0
    for bench in BENCHES:
        print(f"\n=== {' '.join(bench)} ===", flush=True)
        failed |= subprocess.call([sys.executable, str(HERE / bench[0]), *bench[1:]])
    return failed


if __name__ == "__main__":
    sys.exit(main())
