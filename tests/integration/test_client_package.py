"""The thin `adaface-client` distribution: its wheel, installed into a fresh venv without torch,
embeds a photo through a live server and runs the embed CLI."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from .gallery_support import REPO

CONSTRAINTS = REPO / "constraints.txt"


def _pip(python: Path, *args: str, timeout: float = 900) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the client wheel and its dependencies (one per session)."""
    root = tmp_path_factory.mktemp("client_package")
    # Built from a copy (client/ and the protos/ it packages), so no build/ is left in the
    # checkout; dependencies come from pip's cache or its index, pinned like every install.
    junk = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    for part in ("client", "protos"):
        shutil.copytree(REPO / part, root / "src" / part, ignore=junk)
    wheels = root / "wheels"
    _pip(Path(sys.executable), "wheel", "--no-deps", "-w", str(wheels), str(root / "src/client"))
    (wheel,) = wheels.glob("adaface_client-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    _pip(python, "install", "-q", "-c", str(CONSTRAINTS), str(wheel))
    return python


def test_client_wheel_embeds_through_a_server_without_torch(
    client_venv: Path, embed_server, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(buf, format="JPEG", quality=95)
    (photos / "astronaut.jpg").write_bytes(buf.getvalue())

    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        assert importlib.util.find_spec("torch") is None, "torch is installed"
        import adaface_client
        assert "site-packages" in adaface_client.__file__, adaface_client.__file__
        from adaface_client import Client
        with Client({embed_server.address!r}) as client:
            features, norms = client.embed([{str(photos / "astronaut.jpg")!r}])
        assert features.shape == (1, 512) and norms.shape == (1, 1), features.shape
        try:
            adaface_client.GraphSampler
        except ImportError as e:
            print("sampler:", e)
        """
    )
    # Run outside the repository so nothing from the checkout can be imported by accident.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(client_venv), "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sampler: " in proc.stdout and "adaface-client[torch]" in proc.stdout

    cli = client_venv.parent / "adaface-embed"
    out = tmp_path / "features.npz"
    proc = subprocess.run(
        [str(cli), str(photos), "--server", embed_server.address, "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 512 * 4
