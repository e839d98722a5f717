"""Writes tests/data/upstream_state_dict_shapes.json.gz from upstream AdaFace's net.py.

Usage: python tests/tools/dump_upstream_shapes.py UPSTREAM [OUT]
UPSTREAM is net.py, a checkout containing it, or a bare git mirror of mk-minchul/AdaFace.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _upstream import UPSTREAM_CONSTRUCTORS, import_upstream_net

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "upstream_state_dict_shapes.json.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT)
    args = parser.parse_args()
    net = import_upstream_net(args.upstream)
    commit = None
    if args.upstream.is_dir():
        probe = subprocess.run(
            ["git", "-C", str(args.upstream), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        commit = probe.stdout.strip() or None
    archs = {}
    for arch, ctor in UPSTREAM_CONSTRUCTORS.items():
        # The meta device gives names and shapes without allocating the big variants.
        with torch.device("meta"):
            model = getattr(net, ctor)((112, 112))
        archs[arch] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
        print(f"{arch}: {len(archs[arch])} keys", file=sys.stderr)
    payload = {"source": "mk-minchul/AdaFace net.py", "commit": commit, "archs": archs}
    # mtime=0 keeps the gzip byte-identical across regenerations.
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:
        f.write(json.dumps(payload, indent=0, sort_keys=True).encode())
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
