"""Hypothesis strategies for malformed adaface.v1 inputs, each paired with the answer it allows.

Every strategy builds the protobuf first and then derives its expectation from the message as
it will be serialised (float32 rounding, enum values as stored), so the oracle judges exactly
what the server receives.
"""

from __future__ import annotations

import dataclasses
import io
import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image

from adaface.v1 import common_pb2

from ..unit.test_decode import png_bomb  # a PNG whose header claims any size

# Server limits the fuzz server runs with (small, so near-limit cases stay cheap).
MAX_IMAGES = 8
MAX_IMAGE_BYTES = 200_000
MAX_IMAGE_PIXELS = 1_000_000
MAX_SIDE = 65535
CROP = 112

ALIGNED, LANDMARKS, DETECT = (
    common_pb2.ALIGNMENT_ALIGNED,
    common_pb2.ALIGNMENT_LANDMARKS,
    common_pb2.ALIGNMENT_DETECT,
)

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)

# Odd but legal text: NUL, bidi overrides, zero-width and byte-order marks, emoji, combining.
SPECIAL_TEXT = (
    "\x00",
    "a\x00b",
    "\u202eevil\u202c",
    "\u200f\u200e",
    "\ufeff",
    "😀👩‍👩‍👧",
    "e\u0301",
    "a\n",
    "\n",
    " ",
    "..",
    "-a",
    "名前",
    "\U0010ffff",
)


#: Characters identity ids may not hold besides the C0/C1 controls: bidi marks, embeddings,
#: overrides and isolates.
BIDI_FORMATTING = (
    set("\u061c\u200e\u200f")
    | {chr(c) for c in range(0x202A, 0x202F)}
    | {chr(c) for c in range(0x2066, 0x206A)}
)


def identity_refused(text: str) -> bool:
    """Whether the server must refuse `text` as an identity id (length, controls, bidi)."""
    if not 1 <= len(text) <= 256:
        return True
    return any(unicodedata.category(c) == "Cc" or c in BIDI_FORMATTING for c in text)


def any_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Arbitrary unicode (no surrogates: proto strings are UTF-8), plus very long strings."""
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(SPECIAL_TEXT),
        st.builds(
            lambda unit, n: unit * n,
            st.sampled_from(["x", "名", "😀", "\x00", "\u202e"]),
            st.integers(100, 10_000),
        ),
    )


def broken_fields(fields: list[str]) -> st.SearchStrategy[frozenset[str]]:
    """Which fields of a request to break: none (two times in five), one or two."""
    return st.sampled_from([0, 0, 1, 1, 2]).flatmap(
        lambda n: st.frozensets(st.sampled_from(fields), min_size=n, max_size=n)
    )


def floats32() -> st.SearchStrategy[float]:
    """Any float, including NaN, infinities, huge and subnormal values."""
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45]),
    )


def f32(value: float) -> float:
    """The value a protobuf float field stores for `value`."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


class Brief:
    """A generated case that failure reports show compactly: protobufs on one line, long
    values cut (Hypothesis would print every byte of every image)."""

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(brief(self))

    def __repr__(self) -> str:  # subclasses are dataclasses with repr=False
        return brief(self)


def brief(value: object, limit: int = 400) -> str:
    if isinstance(value, Message):
        text = text_format.MessageToString(value, as_one_line=True)
    elif isinstance(value, Brief) and dataclasses.is_dataclass(value):
        fields = (f"{f.name}={brief(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({', '.join(fields)})"
    elif isinstance(value, list | tuple):
        return "[" + ", ".join(brief(v) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# -- images -------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def pixels(seed: int, height: int = CROP, width: int = CROP) -> np.ndarray:
    """Deterministic RGB content: noise, a flat colour or a gradient."""
    rng = np.random.default_rng(seed)
    kind = seed % 3
    if kind == 0:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == 1:
        return np.full((height, width, 3), seed % 256, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)


@lru_cache(maxsize=256)
def encode(seed: int, height: int, width: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels(seed, height, width)).save(buffer, format=fmt)
    return buffer.getvalue()


def decoded_outcomes(mode: int, size: tuple[int, int] | None, landmarks: str) -> set[str]:
    """Per-image outcomes allowed for a decodable image of `size` (None: unknown)."""
    if mode == ALIGNED:
        if size is None:
            return {"OK", "NOT_ALIGNED"}
        return {"OK"} if size == (CROP, CROP) else {"NOT_ALIGNED"}
    if mode == LANDMARKS:
        return {"good": {"OK"}, "degenerate": {"ALIGNMENT_FAILED"}}.get(
            landmarks, {"OK", "ALIGNMENT_FAILED"}
        )
    return {"OK", "NO_FACE", "ALIGNMENT_FAILED"}


@dataclass(frozen=True)
class Source:
    """How an image's pixels are sent, and what decoding them yields."""

    kind: str
    encoded: bytes | None = None
    raw: tuple[int, int, bytes] | None = None
    size: tuple[int, int] | None = None  # decoded (height, width), when known
    outcomes: frozenset[str] | None = None  # fixed outcomes (None: decoded_outcomes)
    corrupt: bool = False  # may decode to anything, or not at all


GOOD_SOURCES = ("crop", "crop", "crop", "sized", "extreme")


@st.composite
def sources(draw, clean: bool = False) -> Source:
    """Pixels as sent; `clean`: only decodable images of known size."""
    kind = draw(
        st.sampled_from(
            GOOD_SOURCES
            if clean
            else [
                *GOOD_SOURCES,
                "truncated",
                "bitflip",
                "bitflip",
                "zero",
                "garbage",
                "bomb",
                "other_format",
                "raw_bad_side",
                "raw_bad_len",
                "unset",
                "too_many_bytes",
                "raw_too_many_pixels",
            ]
        )
    )
    seed = draw(st.integers(0, 40))
    if kind in ("crop", "sized"):
        h, w = (
            (CROP, CROP) if kind == "crop" else (draw(st.integers(1, 96)), draw(st.integers(1, 96)))
        )
        fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "WEBP", "raw"]))
        if fmt == "raw":
            return Source(kind, raw=(h, w, pixels(seed, h, w).tobytes()), size=(h, w))
        return Source(kind, encoded=encode(seed, h, w, fmt), size=(h, w))
    if kind == "extreme":
        h, w = draw(st.sampled_from([(1, 4096), (4096, 1), (12, 2048), (2048, 12), (1, 1), (2, 3)]))
        return Source(kind, raw=(h, w, bytes(h * w * 3)), size=(h, w))
    if kind in ("truncated", "bitflip"):
        data = encode(seed, CROP, CROP, draw(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP"])))
        if kind == "truncated":
            return Source(kind, encoded=data[: draw(st.integers(0, len(data) - 1))], corrupt=True)
        flipped = bytearray(data)
        for pos, bit in draw(
            st.lists(
                st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), min_size=1, max_size=6
            )
        ):
            flipped[pos] ^= 1 << bit
        return Source(kind, encoded=bytes(flipped), corrupt=True)
    if kind == "zero":
        return Source(kind, encoded=b"", outcomes=frozenset({"UNDECODABLE"}))
    if kind == "garbage":
        data = draw(st.binary(min_size=1, max_size=300))
        return Source(kind, encoded=data, outcomes=frozenset({"UNDECODABLE"}))
    if kind == "bomb":
        w, h = draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1))
        if draw(st.booleans()):  # also near and below the limit, where Pillow allocates
            w, h = draw(st.integers(1, 2000)), draw(st.integers(1, 2000))
        if w * h > MAX_IMAGE_PIXELS:
            return Source(kind, encoded=png_bomb(w, h), outcomes=frozenset({"TOO_MANY_PIXELS"}))
        # Tiny claimed sizes are fully covered by the stored 64 zero bytes and do decode.
        return Source(kind, encoded=png_bomb(w, h), size=(h, w), corrupt=True)
    if kind == "other_format":
        data = encode(seed, CROP, CROP, draw(st.sampled_from(["GIF", "TIFF", "ICO", "PPM"])))
        return Source(kind, encoded=data, outcomes=frozenset({"UNDECODABLE"}))
    if kind == "raw_bad_side":
        h = draw(st.sampled_from([0, 1, 112, MAX_SIDE, MAX_SIDE + 1, 2**32 - 1]))
        w = draw(st.sampled_from([0, 1, 112, MAX_SIDE + 1, 2**32 - 1]))
        return Source(kind, raw=(h, w, draw(st.binary(max_size=64))))
    if kind == "raw_bad_len":
        h, w = draw(st.integers(1, 64)), draw(st.integers(1, 64))
        delta = draw(st.integers(-3 * h * w, 64).filter(lambda d: d != 0))
        return Source(kind, raw=(h, w, bytes(3 * h * w + delta)))
    if kind == "too_many_bytes":
        data = b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES)
        return Source(kind, encoded=data, outcomes=frozenset({"TOO_MANY_BYTES"}))
    if kind == "raw_too_many_pixels":
        h, w = 1001, 1000
        return Source(kind, raw=(h, w, bytes(3 * h * w)), outcomes=frozenset({"TOO_MANY_PIXELS"}))
    return Source("unset")


@st.composite
def landmark_lists(draw, good: bool = False) -> tuple[list[float], str]:
    """(values, label): label "good", "degenerate", "none" or "other" (anything goes)."""
    kinds = ["none", "none", "good", "good", "wrong_len", "special", "huge", "degenerate"]
    kind = "good" if good else draw(st.sampled_from(kinds))
    if kind == "none":
        return [], "none"
    if kind == "good":
        eyes_y = draw(st.floats(30, 50))
        return [
            38.0, eyes_y, 74.0, eyes_y, 56.0, 72.0, 42.0, 92.0, 70.0, 92.0,
        ], "good"  # fmt: skip
    if kind == "wrong_len":
        n = draw(st.integers(0, 25).filter(lambda n: n != 10))
        return draw(st.lists(floats32(), min_size=n, max_size=n)), "other"
    if kind == "special":
        values = draw(st.lists(st.floats(-200, 400), min_size=10, max_size=10))
        values[draw(st.integers(0, 9))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf, 1e39])
        )
        return values, "other"
    if kind == "huge":
        return draw(
            st.lists(
                st.sampled_from([3.4e38, -3.4e38, 1e30, -1e30, 1e-45, 0.0]),
                min_size=10,
                max_size=10,
            )
        ), "other"
    x, y = draw(st.floats(-1e6, 1e6)), draw(st.floats(-1e6, 1e6))
    return [x, y] * 5, "degenerate"


@dataclass(frozen=True, repr=False)
class ImageCase(Brief):
    """One ImageInput and what the server must make of it."""

    message: common_pb2.ImageInput
    kind: str
    invalid: str | None  # the request is malformed: details name images[i] + this suffix
    outcomes: frozenset[str]  # otherwise: "OK" or the ImageError reason it may get


def image_field_error(msg: common_pb2.ImageInput, for_detect: bool) -> tuple[str | None, int]:
    """Mirrors the documented ImageInput rules: (details suffix or None, effective mode)."""
    landmarks = list(msg.landmarks)
    if for_detect:
        if landmarks:
            return ".landmarks", DETECT
        mode = DETECT
    else:
        mode = msg.alignment or (LANDMARKS if landmarks else ALIGNED)
        if mode not in (ALIGNED, LANDMARKS, DETECT):
            return ".alignment", mode
        if mode == LANDMARKS:
            if len(landmarks) != 10 or not all(math.isfinite(v) for v in landmarks):
                return ".landmarks", mode
        elif landmarks:
            return ".landmarks", mode
    source = msg.WhichOneof("source")
    if source is None:
        return ": set either encoded or raw", mode
    if source == "raw":
        if not 1 <= msg.raw.height <= MAX_SIDE:
            return ".raw.height", mode
        if not 1 <= msg.raw.width <= MAX_SIDE:
            return ".raw.width", mode
        if len(msg.raw.data) != 3 * msg.raw.height * msg.raw.width:
            return ".raw.data", mode
    return None, mode


@st.composite
def image_cases(draw, for_detect: bool = False, clean: bool | None = None) -> ImageCase:
    """An ImageInput: half of them well-formed (pixels, mode and landmarks that agree),
    the others broken in their pixels, their mode, their landmarks or all of these."""
    if clean is None:
        clean = draw(st.booleans())
    source = draw(sources(clean))
    if clean:
        alignment = draw(st.sampled_from([0, ALIGNED, ALIGNED, LANDMARKS, DETECT]))
        good = alignment == LANDMARKS and not for_detect
        values, label = draw(landmark_lists(good=True)) if good else ([], "none")
    else:
        values, label = draw(landmark_lists())
        if for_detect and draw(st.integers(0, 4)):
            values, label = [], "none"  # Detect takes no landmarks; mostly send none
        alignment = draw(st.sampled_from([0, ALIGNED, LANDMARKS, DETECT, None]))
        if alignment is None:
            alignment = draw(INT32)
    msg = common_pb2.ImageInput(alignment=alignment, landmarks=values)
    if source.encoded is not None:
        msg.encoded = source.encoded
    elif source.raw is not None:
        h, w, data = source.raw
        msg.raw.CopyFrom(common_pb2.RawImage(height=h, width=w, data=data))
    invalid, mode = image_field_error(msg, for_detect)
    if source.outcomes is not None:
        outcomes = set(source.outcomes)
    elif source.kind == "bomb" and mode == ALIGNED and source.size != (CROP, CROP):
        # The header alone settles it: an aligned crop of another size is refused before
        # its (missing) pixels are decoded.
        outcomes = {"NOT_ALIGNED"}
    elif source.corrupt:
        outcomes = {"UNDECODABLE", "TOO_MANY_PIXELS"} | decoded_outcomes(mode, None, label)
    else:
        outcomes = decoded_outcomes(mode, source.size, label)
    if mode == DETECT and "OK" in outcomes:
        outcomes |= {"NO_FACE", "ALIGNMENT_FAILED"}
    return ImageCase(msg, source.kind, invalid, frozenset(outcomes))


# -- detection options ----------------------------------------------------------------------


@st.composite
def detect_options(draw, good: bool) -> tuple[common_pb2.DetectOptions, str | None]:
    """(options, suffix of the first invalid field or None): valid when `good`, else any
    values (out-of-range enums, NaN, infinities, huge and negative sizes and scores)."""
    if good:
        msg = common_pb2.DetectOptions(
            selection=draw(st.integers(0, 3)),
            align_method=draw(st.integers(0, 2)),
            min_face_size=draw(st.one_of(st.just(0.0), st.floats(12, 200))),
            min_score=draw(st.one_of(st.just(0.0), st.floats(0.01, 0.99))),
            return_aligned=draw(st.booleans()),
            upstream_softmax=draw(st.booleans()),
        )
        return msg, None
    enum = st.one_of(st.integers(0, 3), INT32)
    msg = common_pb2.DetectOptions(
        selection=draw(enum),
        align_method=draw(enum),
        min_face_size=draw(st.one_of(st.just(0.0), st.floats(12, 200), floats32())),
        min_score=draw(st.one_of(st.just(0.0), st.floats(0.01, 0.99), floats32())),
        return_aligned=draw(st.booleans()),
        upstream_softmax=draw(st.booleans()),
    )
    if msg.selection not in range(4):
        return msg, ".selection"
    if msg.align_method not in range(3):
        return msg, ".align_method"
    face = msg.min_face_size or 20.0
    if not (math.isfinite(face) and 12.0 <= face <= 10000.0):
        return msg, ".min_face_size"
    score = msg.min_score or 0.9
    if not (math.isfinite(score) and 0.0 < score < 1.0):
        return msg, ".min_score"
    return msg, None


# -- vectors --------------------------------------------------------------------------------


def unit(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(max(dim, 1)).astype(np.float32)[:dim]
    return v / max(float(np.linalg.norm(v)), 1e-12)


@st.composite
def vectors(draw, dim: int, good: bool = False) -> common_pb2.Embedding:
    """An Embedding meant for a `dim`-d gallery: valid (of any magnitude) when `good`,
    else mostly broken in one way."""
    valid = ["good", "good", "extreme"]
    broken = ["wrong_len", "odd_bytes", "nonfinite", "zero", "declared", "empty", "norm"]
    kind = draw(st.sampled_from(valid if good else valid + broken))
    values = unit(draw(st.integers(0, 50)), dim)
    declared = draw(st.sampled_from([0, dim]))
    norm = draw(st.floats(0, 1e6))
    if kind == "extreme":  # legal: finite and non-zero, whatever the magnitude
        scale = draw(st.sampled_from([3.4e38, 1e30, 1e-40, 1e-45, -1.0]))
        with np.errstate(over="ignore", under="ignore"):
            values = np.clip(values.astype(np.float64) * scale, -3.4e38, 3.4e38).astype(np.float32)
        if dim and not values.any():
            values[0] = np.float32(scale)
    elif kind == "wrong_len":
        values, declared = unit(1, draw(st.integers(0, 2 * dim + 3).filter(lambda n: n != dim))), 0
    elif kind == "nonfinite" and dim:
        values = values.copy()
        values[draw(st.integers(0, dim - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "zero":
        values = np.zeros(dim, np.float32)
    elif kind == "declared":
        declared = draw(UINT32.filter(lambda d: d not in (0, dim)))
    elif kind == "empty":
        values, declared = np.zeros(0, np.float32), 0
    elif kind == "norm":
        norm = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0]))
    data = np.asarray(values, "<f4").tobytes()
    if kind == "odd_bytes" and data:
        data = data[: draw(st.integers(0, len(data) - 1).filter(lambda n: n % 4))]
    return common_pb2.Embedding(vector=data, dim=declared, norm=norm)


def vector_error(msg: common_pb2.Embedding, dim: int | None) -> tuple[str | None, bool]:
    """(suffix naming the bad field, early) for a vector checked against `dim` values.

    `early` errors are found while the request is converted (before any gallery lookup);
    the rest when the vector is checked against the gallery. dim None: only early checks.
    """
    if len(msg.vector) % 4:
        return ".vector", True
    if not math.isfinite(msg.norm):
        return ".vector.norm", True
    if dim is None:
        return None, False
    values = np.frombuffer(msg.vector, "<f4")
    if msg.dim and msg.dim != values.size:
        return ".vector.dim", False
    if values.size != dim or not np.isfinite(values).all() or not values.any():
        return ".vector", False
    return None, False
