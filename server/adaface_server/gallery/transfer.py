"""Gallery export/import files: the native streamable format and the seed's gallery.pth."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sqlite3
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import Cancelled, InvalidArgument
from . import store as db
from .index import Change, Stopped

MAGIC = b"ADAFACE-GALLERY 1\n"
CHUNK_BYTES = 1 << 20


@dataclass
class TransferIdentity:
    """One identity with its samples, as written to or read from a file."""

    name: str
    metadata: dict[str, str]
    created_at: float
    vectors: np.ndarray  # [m, dim] float32
    norms: np.ndarray  # [m] float32
    sample_ids: list[int] = field(default_factory=list)  # export only (informational)
    sample_created: list[float] = field(default_factory=list)


@dataclass
class TransferGallery:
    """A parsed import file."""

    name: str
    model_checksum: str
    model_name: str
    dim: int
    metadata: dict[str, str]
    identities: list[TransferIdentity]

    @property
    def sample_count(self) -> int:
        return sum(len(i.vectors) for i in self.identities)


def export_stream(header: dict, identities: Iterable[TransferIdentity]) -> Iterator[bytes]:
    """The native file as chunks of about CHUNK_BYTES (see gallery.proto, ExportChunk)."""
    out = io.BytesIO()
    out.write(MAGIC)
    out.write(_line(header))
    digest = hashlib.sha256()  # of every byte before the end record
    count = samples = 0
    for ident in identities:
        out.write(
            _line(
                {
                    "identity": ident.name,
                    "metadata": ident.metadata,
                    "created_at": ident.created_at,
                    "samples": [
                        {"sample_id": sid, "norm": float(norm), "created_at": created}
                        for sid, norm, created in zip(
                            ident.sample_ids,
                            ident.norms.tolist(),
                            ident.sample_created,
                            strict=True,
                        )
                    ],
                }
            )
        )
        out.write(np.ascontiguousarray(ident.vectors, dtype="<f4").tobytes())
        count += 1
        samples += len(ident.vectors)
        if out.tell() >= CHUNK_BYTES:
            chunk = out.getvalue()
            digest.update(chunk)
            yield chunk
            out = io.BytesIO()
    digest.update(out.getvalue())
    end = {"end": True, "identities": count, "samples": samples, "sha256": digest.hexdigest()}
    out.write(_line(end))
    yield out.getvalue()


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


#: How many identity records an import parses between asking whether to stop.
STOP_CHECK_RECORDS = 1024


def parse_native(
    data: bytes | bytearray | memoryview, should_stop: Callable[[], bool] | None = None
) -> TransferGallery:
    """Parses an export file; a truncated or inconsistent file raises InvalidArgument.
    `should_stop` is asked every STOP_CHECK_RECORDS identities (Stopped when it says so)."""
    view = memoryview(data)
    if len(view) < len(MAGIC) and bytes(view) == MAGIC[: len(view)]:
        raise _ended_early(len(view))
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise InvalidArgument("import: not an adaface gallery export (bad magic); wrong format?")
    pos = len(MAGIC)

    def read_line() -> dict:
        nonlocal pos
        end = _find_newline(view, pos)
        if end < 0:
            raise _ended_early(len(view))
        try:
            obj = json.loads(bytes(view[pos:end]))
        except ValueError as exc:
            raise InvalidArgument(f"import: bad record at byte {pos}: {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidArgument(f"import: bad record at byte {pos}: not a JSON object")
        pos = end + 1
        return obj

    header = read_line()
    try:
        dim = int(header["dim"])
        gallery = TransferGallery(
            name=str(header.get("name", "")),
            model_checksum=str(header["model_checksum"]),
            model_name=str(header.get("model_name", "")),
            dim=dim,
            metadata=_str_map(header.get("metadata", {}), "header.metadata"),
            identities=[],
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"import: bad header: {exc!r}") from None
    if not 1 <= dim <= 65536:
        raise InvalidArgument(f"import: header.dim must be 1..65536, got {dim}")
    while True:
        start = pos
        checkpoint = len(gallery.identities) % STOP_CHECK_RECORDS == 0
        if checkpoint and should_stop is not None and should_stop():
            raise Stopped(f"import stopped at byte {pos} of {len(view)}")
        record = read_line()
        if record.get("end"):
            if record.get("identities") != len(gallery.identities) or record.get("samples") != sum(
                len(i.vectors) for i in gallery.identities
            ):
                raise InvalidArgument(
                    f"import: end record at byte {start} counts {record.get('identities')} "
                    f"identities / {record.get('samples')} samples, file holds "
                    f"{len(gallery.identities)} / {gallery.sample_count}"
                )
            _check_digest(view[:start], record.get("sha256"), start)
            break
        try:
            name = str(record["identity"])
            samples = list(record["samples"])
            norms = np.asarray([float(s.get("norm", 0.0)) for s in samples], np.float32)
            metadata = _str_map(record.get("metadata", {}), f"identity {name!r} metadata")
            created_at = float(record.get("created_at", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise InvalidArgument(f"import: bad identity record at byte {start}: {exc!r}") from None
        nbytes = len(samples) * dim * 4
        if pos + nbytes > len(view):
            raise _ended_early(len(view), f" in the vectors of identity {name!r}")
        vectors = np.frombuffer(view[pos : pos + nbytes], dtype="<f4").reshape(-1, dim)
        pos += nbytes
        gallery.identities.append(
            TransferIdentity(name, metadata, created_at, vectors.astype(np.float32), norms)
        )
    if pos != len(view):
        raise InvalidArgument(f"import: {len(view) - pos} unexpected bytes after the end record")
    return gallery


def _ended_early(size: int, where: str = "") -> Cancelled:
    """A file that stops before its end record is an upload that never finished (a client that
    died mid-stream looks exactly like this): treated as cancelled, nothing is written."""
    return Cancelled(
        f"import: the upload ended at byte {size}{where} before the export's end record "
        "(no end record): treated as cancelled, nothing was written; send the whole file"
    )


def _check_digest(content: memoryview, declared: object, where: int) -> None:
    """The end record's sha256 covers every byte before it. Files from servers that wrote
    no digest (counts only) are still accepted; a digest that does not match is not."""
    if declared is None:
        return
    actual = hashlib.sha256(content).hexdigest()
    if declared != actual:
        raise InvalidArgument(
            f"import: end record at byte {where} declares sha256 {str(declared)[:64]!r}, the "
            f"file's content has {actual}: the file was altered or damaged"
        )


def _find_newline(view: memoryview, pos: int) -> int:
    # JSON lines are small; scan in growing windows rather than copying the whole tail.
    window = 4096
    while True:
        piece = bytes(view[pos : pos + window])
        i = piece.find(b"\n")
        if i >= 0:
            return pos + i
        if pos + window >= len(view):
            return -1
        window *= 4


def _str_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"import: {what} must be an object of strings")
    return {str(k): str(v) for k, v in value.items()}


def parse_seed_pth(data: bytes | bytearray, name: str, model_checksum: str) -> TransferGallery:
    """The AdaFace seed's torch.save({'features': [N,D], 'labels': [N]}) (+ optional 'norms')."""
    import torch  # the server has torch; only this import path needs it

    _check_whole_zip(data)
    try:
        obj = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidArgument(f"import: not a loadable gallery.pth: {exc}") from None
    if not isinstance(obj, dict) or "features" not in obj or "labels" not in obj:
        raise InvalidArgument("import: gallery.pth must be a dict with 'features' and 'labels'")
    features = _as_array(obj["features"], "features")
    if features.ndim != 2:
        raise InvalidArgument(f"import: features must be [N, D], got shape {features.shape}")
    labels = obj["labels"]
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    if len(labels) != len(features):
        raise InvalidArgument(
            f"import: {len(labels)} labels for {len(features)} feature rows; need one per row"
        )
    if "norms" in obj:
        norms = _as_array(obj["norms"], "norms").reshape(-1)
        if len(norms) != len(features):
            raise InvalidArgument(f"import: {len(norms)} norms for {len(features)} feature rows")
    else:
        norms = np.zeros(len(features), np.float32)
    groups: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        groups.setdefault(_label_text(label), []).append(row)
    identities = [
        TransferIdentity(label, {}, 0.0, features[rows], norms[rows])
        for label, rows in groups.items()
    ]
    return TransferGallery(name, model_checksum, "", features.shape[1], {}, identities)


def _check_whole_zip(data: bytes | bytearray) -> None:
    """torch.save writes a zip: it must be complete (central directory present) and every
    member, the pickle included, must match its CRC, or nothing is imported."""
    if bytes(data[:4]) != b"PK\x03\x04":
        return  # the legacy (pre-zip) format: torch.load itself fails on a truncated file
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InvalidArgument(f"import: gallery.pth is not a complete zip archive: {exc}") from None
    if damaged is not None:
        raise InvalidArgument(f"import: gallery.pth member {damaged!r} is damaged (CRC mismatch)")


def _as_array(value: object, what: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().numpy()  # type: ignore[attr-defined]
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"import: {what} is not numeric: {exc}") from None


def _label_text(label: object) -> str:
    if isinstance(label, float) and math.isfinite(label) and label.is_integer():
        return str(int(label))
    return str(label)


def insert_imported(
    conn: sqlite3.Connection, gallery_id: int, identities: list[TransferIdentity]
) -> Change:
    """Inserts a whole imported gallery; returns the index change adding every sample."""
    ident_ids, sample_ids, labels, vectors, names = db.bulk_insert(conn, gallery_id, identities)
    live = sum(1 for i in identities if len(i.vectors))
    return Change(
        add_keys=sample_ids,
        add_labels=labels,
        add_vectors=vectors,
        names=dict(zip(ident_ids, names, strict=True)),
        identity_delta=live,
    )


def group_export(rows: Iterator[tuple], dim: int) -> Iterator[TransferIdentity]:
    current: TransferIdentity | None = None
    current_id = None
    blobs: list[bytes] = []
    norms: list[float] = []

    def finish(ident: TransferIdentity) -> TransferIdentity:
        ident.vectors = np.frombuffer(b"".join(blobs), "<f4").reshape(-1, dim)
        ident.norms = np.asarray(norms, np.float32)
        return ident

    for iid, name, meta, created, sid, norm, s_created, blob in rows:
        if iid != current_id:
            if current is not None:
                yield finish(current)
            blobs, norms = [], []
            current_id = iid
            current = TransferIdentity(
                name, json.loads(meta), created, np.empty((0, dim), np.float32), np.empty(0)
            )
        if sid is not None:
            blobs.append(blob)
            norms.append(norm)
            current.sample_ids.append(sid)  # type: ignore[union-attr]
            current.sample_created.append(s_created)  # type: ignore[union-attr]
    if current is not None:
        yield finish(current)
