"""README.md's examples run: every ```python and ```bash block, against a live server, with
real photos under the placeholder names. A block that cannot run here is marked just above its
fence with `<!-- not-run: REASON -->`; REASON must be one of NOT_RUN below, which says why."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from .gallery_support import REPO, crop
from .server_harness import ServerThread, server_settings

README = REPO / "README.md"

# Why a block may stay unrun. Anything else marked not-run fails the test.
NOT_RUN = {
    # `make serve` / `adaface-server ...` block until stopped; the test runs its own server.
    "serves in the foreground until stopped": "a server process, not an example call",
    "serves in the foreground until stopped; the README test starts its own server": (
        "a server process, not an example call"
    ),
    "serves in the foreground and needs certificates": "a server process with TLS files",
    # Real AdaFace weights are a user's own download; nothing is fetched at test time.
    "needs a real checkpoint": "no released checkpoint on this machine",
    # adaface-eval's calibration wants same/different pairs of real people.
    "needs labelled pairs of real faces": (
        "tests/integration/test_eval_cli.py calibrates on generated pairs and a .bin"
    ),
    "needs a TLS server, its CA and a client certificate": (
        "TLS is tested in tests/integration/test_client_security.py with generated PKI"
    ),
    "needs a running Triton server": "Triton is tested in tests/integration/test_triton.py",
    "needs rootful podman; make test-containers runs these steps": (
        "tests/containers/ build and run the images with podman (make test-containers)"
    ),
    "needs a Kubernetes cluster; tests/unit/test_k8s_manifests.py validates the manifests": (
        "no cluster on CI; the manifests are validated offline against the schemas"
    ),
    "needs Docker": "no Docker engine on CI; tests/unit/test_docker_files.py checks the files",
    "needs a Ray cluster, a manifest and object storage": (
        "tests/integration/test_ray_extract.py runs both calls on a local Ray"
    ),
    # Installing would replace the editable install of the venv the tests run in.
    "installs packages; tests/integration/test_client_package.py installs the wheel into a "
    "fresh venv": "tested there, in a venv of its own",
}

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!-- not-run: (.+?) -->$")


def readme_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, not-run reason or None) of every fenced block."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        marker = _MARKER.match(lines[start - 1]) if start else None
        blocks.append((start + 1, lang, "\n".join(body) + "\n", marker and marker.group(1)))
        i += 1
    return blocks


def test_the_block_parser_sees_markers_and_languages() -> None:
    text = "x\n<!-- not-run: needs Docker -->\n```bash\necho a\n```\n\n```python\nprint(1)\n```\n"
    assert readme_blocks(text) == [
        (3, "bash", "echo a\n", "needs Docker"),
        (7, "python", "print(1)\n", None),
    ]


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The folder the examples run in: real photos under the README's placeholder names."""
    root = tmp_path_factory.mktemp("readme")
    photo = skimage.data.astronaut()  # one real face, 512x512
    mirrored = np.ascontiguousarray(photo[:, ::-1])
    small = np.asarray(Image.fromarray(photo).resize((112, 112), Image.BILINEAR))
    for name in ("a.jpg", "me.jpg", "group.jpg", "alice1.jpg", "probe.jpg"):
        _write(root / name, _jpeg(photo))
    for name in ("b.png", "alice2.jpg"):
        Image.fromarray(mirrored).save(root / name)
    Image.fromarray(small).save(root / "crop.png")
    _write(root / "photos" / "astronaut.jpg", _jpeg(photo))
    _write(root / "photos" / "more" / "mirrored.jpg", _jpeg(mirrored))
    for i in range(3):
        (root / "crops").mkdir(exist_ok=True)
        Image.fromarray(crop(i)).save(root / "crops" / f"{i}.png")
    # The astronaut's 5 points, rounded (x1, y1, ..., x5, y5): aligned from these, not detected.
    points = [184.6, 151.6, 226.7, 150.8, 201.4, 172.4, 188.3, 202.3, 223.2, 201.3]
    (root / "landmarks.json").write_text(json.dumps({"astronaut.jpg": points}))
    _write(root / "people" / "alice" / "1.jpg", _jpeg(photo))
    _write(root / "people" / "bob" / "1.jpg", _jpeg(mirrored))
    labels = ["x", "y", "x", "z"]
    torch.save({"features": torch.randn(4, 512), "labels": labels}, root / "gallery.pth")
    (root / "faces").mkdir()
    for pid in range(8):
        for k in range(4):
            Image.fromarray(crop(100 * pid + k)).save(root / "faces" / f"{pid}_{k}.png")
    (root / "shared").mkdir()
    # `source .venv/bin/activate` and `python client/...` as from the repository root.
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "client").symlink_to(REPO / "client")
    return root


@pytest.fixture(scope="module")
def server(ir18_repository, tmp_path_factory):
    repository, name = ir18_repository
    path = tmp_path_factory.mktemp("readme_gallery") / "galleries.sqlite3"
    settings = server_settings(repository, name, gallery_path=path, http_port=0)
    server = ServerThread(settings).start()
    yield server.wait_serving()
    server.stop()


def test_every_runnable_readme_example_works(server, workdir) -> None:
    blocks = [b for b in readme_blocks(README.read_text()) if b[1] in ("python", "bash")]
    unexplained = sorted({reason for *_, reason in blocks if reason and reason not in NOT_RUN})
    assert not unexplained, f"not-run markers with no reason in NOT_RUN: {unexplained}"
    runnable = [b for b in blocks if b[3] is None]
    assert len(runnable) >= 6, "the README's Client, CLI and gallery examples must run"

    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "VIRTUAL_ENV": sys.prefix,
        "PYTHONUNBUFFERED": "1",
    }
    for line, lang, code, _ in runnable:
        code = code.replace("localhost:50051", server.address)
        code = code.replace("localhost:8080", f"127.0.0.1:{server.app.http_port}")
        argv = [sys.executable, "-"] if lang == "python" else ["bash", "-e", "-o", "pipefail"]
        proc = subprocess.run(
            argv, input=code, cwd=workdir, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (
            f"README.md line {line} ({lang}) failed with exit code {proc.returncode}:\n"
            f"{code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
