"""JPEG decoding per image: the server's decode_image (libjpeg-turbo fast path for plain
colour JPEGs) vs the Pillow path it falls back to, interleaved rounds in one run.

Usage: python bench/bench_decode.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time

import numpy as np
from PIL import Image, ImageOps

from adaface_server.preprocess.decode import DecodeLimits, decode_image

LIMITS = DecodeLimits(max_bytes=20 << 20, max_pixels=40_000_000)


def pillow_path(data: bytes) -> np.ndarray:
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data), formats=("JPEG",)))
    return np.asarray(img.convert("RGB"))


def sample_jpeg(h: int, w: int) -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
    arr = np.clip(arr + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def per_call_us(fn, data: bytes, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn(data)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| JPEG | Pillow path us | decode_image us | speed-up | same pixels |")
    print("|---|---:|---:|---:|---|")
    for (h, w), calls in (((112, 112), 300), ((480, 640), 40)):
        data = sample_jpeg(h, w)
        same = np.array_equal(pillow_path(data), decode_image(data, LIMITS))
        slow, fast = [], []
        for _ in range(args.rounds):
            slow.append(per_call_us(pillow_path, data, calls))
            fast.append(per_call_us(lambda d: decode_image(d, LIMITS), data, calls))
        s, f = statistics.median(slow), statistics.median(fast)
        print(f"| {w}x{h} | {s:.0f} | {f:.0f} | {s / f:.2f}x | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
