"""MTCNN detection latency on photos of several sizes (astronaut scaled, so a face is found).

Usage: python bench/bench_detect.py [--repeats 5] [--threads 2] [--weights .cache/mtcnn]

Prints the median ms per detect() call at 512^2, 1024^2 and 1600x1200 (the last is
downscaled to --detect-max-side 1024 first, as the server does). Figures are only
comparable within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image

from adaface_server.preprocess.detect import MTCNN

SIZES = ((512, 512), (1024, 1024), (1600, 1200))


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
