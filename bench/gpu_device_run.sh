#!/usr/bin/env bash
# The GPU checks in one command, for a machine lent for a few minutes (one H200 here):
# the CUDA-marked tests, then bench/bench_gpu.py (served rows at 1 and 4 workers, and the
# gallery rows), everything logged to $OUT/gpu.log as it runs. The steps' timeouts add up to
# 530 s, inside a 600 s device command (run it with timeout_s=600).
#
# On this side first:   make gpu-wheels   (the wheels the GPU image lacks, into .whl/)
# Then on the GPU:      bash bench/gpu_device_run.sh   with .whl and .cache/mtcnn carried.
# A dry run on a CPU:   PYTHON=.venv/bin/python GPU_KIT_INSTALL=0 OUT=/tmp/gpu bash bench/gpu_device_run.sh
#   (the CUDA tests skip and bench_gpu.py says "skipped: no CUDA device").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
export PYTHONUNBUFFERED=1

say() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

if [ "${GPU_KIT_INSTALL:-1}" = 1 ]; then
    say "installing .whl/ into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG" || exit 1
    SITE=:/tmp/site
else
    SITE=
fi
export PYTHONPATH="server:client:protos$SITE"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} | tee -a "$LOG"

say "CUDA-marked tests"
timeout 100 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rs \
    tests/unit/test_detect.py tests/unit/test_precision.py tests/unit/test_gallery_device_search.py \
    2>&1 | tee -a "$LOG"

say "bench_gpu.py: raw and served (1 and 4 workers, 5 s a kind)"
timeout 280 "$PYTHON" bench/bench_gpu.py --workers 1 4 --seconds 5 --no-gallery \
    2>&1 | tee -a "$LOG"

say "bench_gpu.py: gallery search at 1M and 10M"
timeout 150 "$PYTHON" bench/bench_gpu.py --gallery-only 2>&1 | tee -a "$LOG"
say "done"
