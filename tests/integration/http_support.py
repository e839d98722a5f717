"""Helpers for the HTTP API tests: a real server with --http-port 0, and a tiny HTTP client."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from .server_harness import ServerThread, server_settings


def start_http_server(repository, model: str, **overrides: object) -> ServerThread:
    settings = server_settings(repository, model, http_port=0, **overrides)
    return ServerThread(settings).start().wait_serving()


def base_url(server: ServerThread) -> str:
    assert server.app is not None
    return f"http://127.0.0.1:{server.app.http_port}"


def encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def astronaut_jpeg() -> bytes:
    """A real face photo (scikit-image's astronaut, Eileen Collins)."""
    return encode(skimage.data.astronaut())


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


def request(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> Reply:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            status, got, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, got, payload = exc.code, dict(exc.headers), exc.read()
    text = payload.decode()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return Reply(status, {k.lower(): v for k, v in got.items()}, parsed)


def multipart(
    files: list[tuple[str, str, bytes]], fields: dict[str, str] | None = None
) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, filename, content in files:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        out.write(content + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
