"""Writes tests/data/golden_ir18.npz and its input PNGs using upstream AdaFace's own net.py.

Usage: python tests/tools/make_golden.py UPSTREAM [OUT_DIR]
UPSTREAM is net.py, a checkout containing it, or a bare git mirror of mk-minchul/AdaFace.

The reference path shares nothing with adaface_server's forward code: upstream's build_model,
upstream inference.py's key stripping (key[6:] for 'model.' keys) and its to_input()
preprocessing (RGB -> BGR, (x / 255 - 0.5) / 0.5 in float64, then .float()). Only the seed-0
random weights come from adaface_server (random_state_dict + save_adaface_checkpoint), so the
checkpoint file itself is also exercised in the real AdaFace layout.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _upstream import import_upstream_net

from adaface_server.models.checkpoint import random_state_dict, save_adaface_checkpoint

ARCH = "ir_18"
SEED = 0
IMAGE_NAMES = ("golden_gradient.png", "golden_checker.png", "golden_noise.png")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data"


def make_images() -> list[np.ndarray]:
    """Three deterministic 112x112 RGB uint8 images: gradient, checkerboard, uniform noise."""
    yy, xx = np.mgrid[0:112, 0:112]
    gradient = np.stack([xx * 255 / 111, yy * 255 / 111, (xx + yy) * 255 / 222], axis=-1)
    checker = ((xx // 14 + yy // 14) % 2)[..., None] * np.array([230, 40, 120]) + 10
    noise = np.random.default_rng(SEED).integers(0, 256, size=(112, 112, 3))
    return [
        np.asarray(a, dtype=np.float64).round().astype(np.uint8) for a in (gradient, checker, noise)
    ]


def upstream_to_input(pil_rgb_image: Image.Image) -> torch.Tensor:
    """Upstream inference.py to_input semantics, written out."""
    np_img = np.array(pil_rgb_image)
    bgr = ((np_img[:, :, ::-1] / 255.0) - 0.5) / 0.5
    return torch.tensor(np.array([bgr.transpose(2, 0, 1)])).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path)
    parser.add_argument("out_dir", type=Path, nargs="?", default=DEFAULT_OUT)
    args = parser.parse_args()
    net = import_upstream_net(args.upstream)

    for name, pixels in zip(IMAGE_NAMES, make_images(), strict=True):
        Image.fromarray(pixels, mode="RGB").save(args.out_dir / name)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path = Path(tmp) / "ir18_seed0.ckpt"
        save_adaface_checkpoint(random_state_dict(ARCH, SEED), ckpt_path, arch=ARCH)
        statedict = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    model = net.build_model(ARCH)
    model.load_state_dict({k[6:]: v for k, v in statedict.items() if k.startswith("model.")})
    model.eval()

    embeddings, norms = [], []
    with torch.no_grad():
        for name in IMAGE_NAMES:
            # Read back the PNG so the reference sees exactly the committed pixels.
            image = Image.open(args.out_dir / name).convert("RGB")
            feature, norm = model(upstream_to_input(image))
            embeddings.append(feature.numpy())
            norms.append(norm.numpy())
    commit = subprocess.run(
        ["git", "-C", str(args.upstream), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    np.savez(
        args.out_dir / "golden_ir18.npz",
        embeddings=np.concatenate(embeddings).astype(np.float32),
        norms=np.concatenate(norms).astype(np.float32),
        images=np.array(IMAGE_NAMES),
        arch=np.array(ARCH),
        seed=np.array(SEED),
        upstream_commit=np.array(commit),
    )
    print(f"wrote {args.out_dir / 'golden_ir18.npz'}", file=sys.stderr)


if __name__ == "__main__":
    main()
