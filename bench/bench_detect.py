"""MTCNN detection cost: photo sizes, the parity path vs the default, precision, batching.

Usage: python bench/bench_detect.py [--repeats 5] [--threads 2] [--weights .cache/mtcnn]

Prints the median ms per detect() call at 512^2, 1024^2 and 1600x1200 (the last is
downscaled to --detect-max-side 1024 first, as the server does), then ms per 640x480 photo
(bench_server's photos: one face on a noisy background) for: the image pyramid resized by
PIL (as upstream, and as the `upstream_softmax` parity path does; that path itself is not a
fair row, its softmax passes far fewer P-Net candidates), the default (torch's pyramid) one
photo at a time, the default with 8 photos per detect_many() call (R-Net and O-Net batched,
what the server does with a call's photos), the same at bf16 where the CPU has bf16
kernels, and the nets compiled by OpenVINO (--detect-runtime openvino) in fp32 and bf16.
Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import face_photos

from adaface_server.backends.openvino import openvino_available
from adaface_server.backends.precision import cpu_supports_bf16
from adaface_server.preprocess.detect import MTCNN, DetectParams

SIZES = ((512, 512), (1024, 1024), (1600, 1200))


class PilPyramid(MTCNN):
    """The default detector with the image pyramid resized by PIL, as upstream does."""

    def _pyramid(self, image: np.ndarray, sizes: list[tuple[int, int]], exact: bool):
        return super()._pyramid(image, sizes, exact=True)


def per_photo_ms(run, photos: list[np.ndarray], repeats: int) -> float:
    run(photos)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(photos)
        times.append((time.perf_counter() - start) * 1000 / len(photos))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--weights", type=Path, default=Path(".cache/mtcnn"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    detector = MTCNN(args.weights, max_side=args.max_side)
    photo = Image.fromarray(skimage.data.astronaut())
    print(f"threads={args.threads} max_side={args.max_side} repeats={args.repeats}")
    for width, height in SIZES:
        image = np.asarray(photo.resize((width, height), Image.BILINEAR))
        detector.detect(image)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            faces = detector.detect(image)
            times.append((time.perf_counter() - start) * 1000)
        print(
            f"{width}x{height}: {statistics.median(times):7.1f} ms median "
            f"(min {min(times):.1f}), {len(faces)} face(s)"
        )

    photos = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in face_photos(8)]
    pil = PilPyramid(args.weights, max_side=args.max_side)
    rows = {
        "PIL pyramid (upstream's resizing), one photo per call": lambda ps: [
            pil.detect(p) for p in ps
        ],
        "default fp32, one photo per call": lambda ps: [detector.detect(p) for p in ps],
        "default fp32, 8 photos per call": lambda ps: detector.detect_many(
            ps, [DetectParams()] * len(ps)
        ),
    }
    if cpu_supports_bf16():
        bf16 = MTCNN(args.weights, max_side=args.max_side, precision="bf16")
        rows["bf16, 8 photos per call"] = lambda ps: bf16.detect_many(
            ps, [DetectParams()] * len(ps)
        )
    if openvino_available():
        for precision in ("fp32", "bf16") if cpu_supports_bf16() else ("fp32",):
            ov = MTCNN(
                args.weights, max_side=args.max_side, precision=precision, runtime="openvino",
                threads=args.threads,
            )  # fmt: skip
            rows[f"OpenVINO {precision}, 8 photos per call"] = lambda ps, ov=ov: ov.detect_many(
                ps, [DetectParams()] * len(ps)
            )
    print("\n| 640x480 photos | ms per photo | speed-up over PIL pyramid |")
    print("|---|---:|---:|")
    base = None
    for label, run in rows.items():
        ms = per_photo_ms(run, photos, args.repeats)
        base = base or ms
        print(f"| {label} | {ms:.1f} | {base / ms:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
