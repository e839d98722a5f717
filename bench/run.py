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
    ["bench_triton.py"],
    ["bench_gallery.py"],
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
