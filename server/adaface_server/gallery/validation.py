"""Validation of gallery inputs: names, identities, metadata, vectors, imports, page tokens."""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata

import numpy as np

from ..errors import InvalidArgument
from .transfer import TransferGallery

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_IDENTITY_CHARS = 256
MAX_METADATA_BYTES = 16384
MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_PROBES = 1024
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
DEFAULT_DIM = 512
MAX_SAMPLE_ID = 2**63 - 1
_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32
_F32_MAX = float(np.finfo(np.float32).max)
SCORINGS = ("max", "mean")
# Marks, embeddings, overrides and isolates that reorder how text is displayed.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
MODES = ("create", "append", "upsert")
FORMATS = ("native", "seed_pth")


def shown(text: str, limit: int = 64) -> str:
    """`text` quoted for an error message, cut to `limit` characters: status details travel
    in a trailer that clients cap at 8 KiB, so echoing a 10k-character name would turn the
    caller's INVALID_ARGUMENT / NOT_FOUND into a RESOURCE_EXHAUSTED about metadata size."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_name(name: str, field_name: str) -> None:
    # fullmatch: `$` in a match() pattern also accepts a trailing newline ("a\n").
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{field_name}: gallery names are 1..128 characters of [A-Za-z0-9._-] starting "
            f"with a letter or digit, got {shown(name)}"
        )


def check_identity(identity: str, field_name: str) -> None:
    """1..256 characters, none of them a control character (NUL, newline, DEL, C1) or a
    bidirectional formatting one (U+202E and kin), which make ids print as something else in
    logs, exports and other people's tools."""
    if not 1 <= len(identity) <= MAX_IDENTITY_CHARS:
        raise InvalidArgument(
            f"{field_name}: must be 1..{MAX_IDENTITY_CHARS} characters, got {len(identity)}"
        )
    for position, char in enumerate(identity):
        if unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS:
            raise InvalidArgument(
                f"{field_name}: character U+{ord(char):04X} at position {position} is a "
                "control or bidirectional formatting character, not allowed in identity ids"
            )


def check_metadata(metadata: dict[str, str], field_name: str) -> None:
    size = len(json.dumps(metadata))
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument(
            f"{field_name}: at most {MAX_METADATA_BYTES} bytes as JSON, got {size}"
        )


def check_vector(vector: np.ndarray, declared: int, dim: int, field_name: str) -> np.ndarray:
    """The unit float32 version of `vector`, or InvalidArgument naming the field."""
    if declared and declared != vector.size:
        raise InvalidArgument(
            f"{field_name}.dim: says {declared}, but the vector holds {vector.size} values"
        )
    if vector.size != dim:
        raise InvalidArgument(
            f"{field_name}: need {dim} float32 values ({4 * dim} bytes), got {vector.size}"
        )
    bad = np.flatnonzero(~np.isfinite(vector))
    if bad.size:
        raise InvalidArgument(
            f"{field_name}: values must be finite; value [{bad[0]}] is {vector[bad[0]]}"
        )
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if norm == 0.0:
        raise InvalidArgument(f"{field_name}: an all-zero vector has no direction")
    if _F32_TINY <= norm <= _F32_MAX:
        return (vector / norm).astype(np.float32)
    # A norm float32 cannot hold (large values: dividing by inf stored an all-zero "unit"
    # vector; subnormal ones lost their direction) is divided in float64.
    return (vector.astype(np.float64) / norm).astype(np.float32)


def check_import(parsed: TransferGallery) -> None:
    if not re.fullmatch(r"[0-9a-f]{64}", parsed.model_checksum):
        raise InvalidArgument(
            "import: model_checksum must be 64 lowercase hex digits (sha256), got "
            f"{shown(parsed.model_checksum)}"
        )
    check_metadata(parsed.metadata, "import: header.metadata")
    seen: set[str] = set()
    for i, ident in enumerate(parsed.identities):
        where = f"import: identity [{i}] {shown(ident.name)}"
        check_identity(ident.name, where)
        check_metadata(ident.metadata, f"{where} metadata")
        if ident.name in seen:
            raise InvalidArgument(f"{where}: appears twice")
        seen.add(ident.name)
        v = ident.vectors
        if v.shape[1:] != (parsed.dim,):
            raise InvalidArgument(f"{where}: vectors of shape {v.shape}, need [m, {parsed.dim}]")
        bad = np.argwhere(~np.isfinite(v))
        if bad.size:
            raise InvalidArgument(f"{where} sample [{bad[0][0]}]: values must be finite")
        quality = np.flatnonzero(~np.isfinite(np.asarray(ident.norms, np.float64)))
        if quality.size:
            raise InvalidArgument(f"{where} sample [{quality[0]}]: norm must be finite")
        wide = np.linalg.norm(v.astype(np.float64), axis=1)
        zero = np.flatnonzero(wide == 0)
        if zero.size:
            raise InvalidArgument(f"{where} sample [{zero[0]}]: an all-zero vector")
        with np.errstate(over="ignore", under="ignore"):
            norms = np.linalg.norm(v, axis=1)
            unit = v / norms[:, None]
        # Rows whose float32 norm overflowed or underflowed are divided in float64.
        odd = np.flatnonzero(~((norms >= _F32_TINY) & (norms <= _F32_MAX)))
        unit[odd] = v[odd].astype(np.float64) / wide[odd, None]
        ident.vectors = unit.astype(np.float32)


def encode_page_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument(
            f"page_token: not a token this server issued: {shown(token)}"
        ) from None
