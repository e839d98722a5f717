"""Per-image work: JPEG decoding (the server's decode_image, with its libjpeg-turbo fast path
for plain colour JPEGs, vs the Pillow path it falls back to) and the alignment warp (OpenCV's
warpAffine, which the server uses, vs the numpy port it falls back to), interleaved rounds.

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

from adaface_server.preprocess import align
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
    warps(args.rounds)
    return 0


def warps(rounds: int, calls: int = 200) -> None:
    """A 112x112 crop from a 640x480 photo, as alignment (landmarks or detection) cuts it."""
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    landmarks = align.ADAFACE_TEMPLATE_112 * 1.8 + [200.0, 120.0]
    matrix = align.adaface_similarity(landmarks)
    if align._opencv() is None:
        print("\nalignment warp: OpenCV 4.x not installed or refused; only the numpy port runs")
        return
    same = np.array_equal(align.warp_affine(image, matrix), align.warp_affine_numpy(image, matrix))
    port, cv = [], []
    for _ in range(rounds):
        port.append(per_call_us(lambda m: align.warp_affine_numpy(image, m), matrix, calls))
        cv.append(per_call_us(lambda m: align.warp_affine(image, m), matrix, calls))
    p, c = statistics.median(port), statistics.median(cv)
    print("\n| alignment warp, 112x112 from 640x480 | numpy port us | cv2.warpAffine us | speed-up "
          "| same pixels |\n|---|---:|---:|---:|---|")  # fmt: skip
    print(f"| AdaFace similarity | {p:.0f} | {c:.0f} | {p / c:.1f}x | {same} |")


if __name__ == "__main__":
    sys.exit(main())
