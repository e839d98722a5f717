"""Writes tests/data/arcface_torch_state_dict_shapes.json.gz and golden_arcface_r18.npz.

Usage: python tests/tools/make_arcface_torch_reference.py IRESNET_PY [OUT_DIR]
IRESNET_PY is InsightFace's ``recognition/arcface_torch/backbones/iresnet.py`` (the file
itself, or a checkout / bare mirror of deepinsight/insightface, read with ``git show``).

The shapes come from upstream's own ``iresnet18/34/50/100()`` built on the meta device. The
golden vectors come from upstream's ``iresnet18()`` loaded strictly with
``random_arcface_state_dict('r18', 0)`` (the only adaface_server code on the reference path),
fed the three golden PNGs as RGB ``(x/255 - 0.5)/0.5`` in float64 then float32, eval mode, one
image per forward; the raw feature is stored, unnormalised.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adaface_server.models.arcface_iresnet import random_arcface_state_dict

UPSTREAM_PATH = "recognition/arcface_torch/backbones/iresnet.py"
CONSTRUCTORS = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100"}
IMAGE_NAMES = ("golden_gradient.png", "golden_checker.png", "golden_noise.png")
DATA = Path(__file__).resolve().parents[1] / "data"


def import_iresnet(source: Path) -> tuple[object, str | None]:
    """Import upstream iresnet.py from the file or a (bare) git repository; (module, commit)."""
    commit = None
    if source.is_file():
        path = source
    else:
        git = ["git", "-C", str(source)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = commit.stdout.strip() or None
        text = subprocess.run(
            [*git, "show", f"HEAD:{UPSTREAM_PATH}"], check=True, capture_output=True, text=True
        ).stdout
        path = Path(tempfile.mkdtemp(prefix="arcface_torch_")) / "iresnet.py"
        path.write_text(text)
    spec = importlib.util.spec_from_file_location("arcface_torch_iresnet", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path)
    parser.add_argument("--commit", default=None, help="upstream commit, when given a file")
    parser.add_argument("out_dir", type=Path, nargs="?", default=DATA)
    args = parser.parse_args()
    net, commit = import_iresnet(args.upstream)
    commit = commit or args.commit
    archs = {}
    for arch, ctor in CONSTRUCTORS.items():
        with torch.device("meta"):
            model = getattr(net, ctor)()
        archs[arch] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
        print(f"{arch}: {len(archs[arch])} keys", file=sys.stderr)
    payload = {
        "source": f"deepinsight/insightface {UPSTREAM_PATH}",
        "commit": commit,
        "archs": archs,
    }
    shapes_out = args.out_dir / "arcface_torch_state_dict_shapes.json.gz"
    # mtime=0 keeps the gzip byte-identical across regenerations.
    with gzip.GzipFile(shapes_out, "wb", mtime=0) as f:
        f.write(json.dumps(payload, indent=0, sort_keys=True).encode())
    print(f"wrote {shapes_out}", file=sys.stderr)

    model = net.iresnet18()
    model.load_state_dict(random_arcface_state_dict("r18", 0), strict=True)
    model.eval()
    images = [np.array(Image.open(DATA / name).convert("RGB")) for name in IMAGE_NAMES]
    features = []
    with torch.no_grad():
        for image in images:
            rgb = ((image / 255.0) - 0.5) / 0.5
            x = torch.tensor(rgb.transpose(2, 0, 1)[None]).float()
            features.append(model(x)[0].numpy())
    golden_out = args.out_dir / "golden_arcface_r18.npz"
    np.savez_compressed(
        golden_out,
        features=np.stack(features).astype(np.float32),
        arch="r18",
        seed=0,
        upstream_commit=str(commit),
    )
    print(f"wrote {golden_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
