"""What an extraction output file holds: the ordered inputs, the model and the options.

Written next to every output file (``out.manifest.json``, plus ``out.inputs.npy`` with one
64-bit fingerprint per row) before any row is computed, and compared on every later run and
by every rank: rows already in the file are reused only when they were computed from the
same inputs, in the same order, by the same model with the same options.

A row's identity: a path's absolute name, size and modification time (the file is not read);
bytes, arrays and PIL images by a hash of their content; anything else by its protobuf
serialisation or refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ManifestMismatch", "build_manifest", "compare_manifest", "row_fingerprints"]

VERSION = 1


class ManifestMismatch(ValueError):
    """An output file was written for other inputs, another model or other options."""


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part)
    return int.from_bytes(h.digest(), "little")


def fingerprint(item: Any) -> int:
    """A 64-bit identity of one input image (see the module docstring)."""
    if isinstance(item, str | os.PathLike):
        path = os.path.abspath(os.fspath(item))
        try:
            st = os.stat(path)
            meta = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            meta = "missing"
        return _digest(b"path\0", path.encode("utf-8", "surrogateescape"), b"\0", meta.encode())
    if isinstance(item, bytes | bytearray | memoryview):
        return _digest(b"bytes\0", bytes(item))
    if isinstance(item, np.ndarray):
        header = f"{item.dtype.str}:{item.shape}".encode()
        return _digest(b"array\0", header, b"\0", np.ascontiguousarray(item).tobytes())
    if hasattr(item, "mode") and hasattr(item, "tobytes") and hasattr(item, "size"):  # PIL
        header = f"{item.mode}:{item.size}".encode()
        return _digest(b"pil\0", header, b"\0", item.tobytes())
    if hasattr(item, "SerializeToString"):
        return _digest(b"proto\0", item.SerializeToString(deterministic=True))
    raise TypeError(f"cannot fingerprint an input of type {type(item).__name__}")


def row_fingerprints(images: Sequence[Any]) -> np.ndarray:
    """[N] uint64: the fingerprint of every input, in order."""
    return np.fromiter((fingerprint(x) for x in images), dtype=np.uint64, count=len(images))


def build_manifest(
    rows: np.ndarray,
    *,
    dim: int,
    model: str,
    model_checksum: str,
    alignment: Any,
    landmarks: Sequence[Any] | None,
    flip: bool,
) -> dict[str, Any]:
    """The manifest of one output file; `rows` from row_fingerprints."""
    landmark_hash = None
    if landmarks is not None:
        h = hashlib.sha256()
        for lm in landmarks:
            h.update(b"-" if lm is None else np.asarray(lm, dtype="<f8").tobytes())
            h.update(b"\0")
        landmark_hash = h.hexdigest()
    return {
        "version": VERSION,
        "rows": int(rows.size),
        "inputs_sha256": hashlib.sha256(rows.astype("<u8").tobytes()).hexdigest(),
        "dim": int(dim),
        "model": model,
        "model_checksum": model_checksum,
        "alignment": None if alignment is None else str(alignment),
        "landmarks_sha256": landmark_hash,
        "flip": bool(flip),
    }


def compare_manifest(
    path: Path, want: dict[str, Any], rows: np.ndarray, stored_rows: np.ndarray | None
) -> None:
    """Raises ManifestMismatch naming every field of `path`'s manifest that differs from
    `want`, and the first differing input row when the per-row fingerprints are there."""
    have = json.loads(path.read_text())
    diffs = [
        f"{key}: file has {have.get(key)!r}, this run {value!r}"
        for key, value in want.items()
        if have.get(key) != value
    ]
    if not diffs:
        return
    if stored_rows is not None and have.get("inputs_sha256") != want["inputs_sha256"]:
        common = min(stored_rows.size, rows.size)
        differ = np.flatnonzero(stored_rows[:common] != rows[:common])
        if differ.size:
            diffs.append(f"first differing input: row {int(differ[0])}")
    raise ManifestMismatch(
        f"{path} describes another extraction ({'; '.join(diffs)}): pass overwrite=True to "
        "discard the old rows, or write to another file"
    )
