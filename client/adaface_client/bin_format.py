"""InsightFace validation `.bin` files (lfw.bin, cfp_fp.bin, ...) read without running code.

A `.bin` is a pickle of `(images, issame)`: a list of encoded 112x112 crops (JPEG bytes) and
one same/different label per consecutive pair of images, as a list of bools or a numpy bool
array. Many were written by Python 2, so strings load as bytes. The unpickler resolves no
real global: numpy's ndarray/dtype/_reconstruct/_frombuffer/scalar names (and the latin1
encoder protocol-2 pickles use for bytes) map to stand-ins here that check their arguments
and state and build only bytes and bool arrays; numpy never sees the pickled state, and
anything else in the file is refused with the file's name.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BinFormatError", "ValidationSet", "load_bin", "loads_bin"]

_BOOL_CODES = frozenset({"b1", "?", "bool"})


class BinFormatError(ValueError):
    """A `.bin` file that is not a plain (images, issame) pickle; the message names the file."""


def _text(value: object) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{what} refused: only bytes, lists, tuples and bool arrays")


class _BoolDtype:
    """Stands in for numpy.dtype("b1") while unpickling: its pickled state is checked here
    and never handed to numpy (a crafted dtype state could mark raw bytes as objects)."""

    def __init__(self, spec: object, *args: object) -> None:
        if _text(spec) not in _BOOL_CODES or not all(isinstance(a, (bool, int)) for a in args):
            raise _refuse(f"numpy dtype {_text(spec)!r}")

    def __setstate__(self, state: object) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags)
        if not (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[0] in (3, 4)
            and _text(state[1]) in ("|", "=", "<", ">")
            and state[2:5] == (None, None, None)
            and all(isinstance(v, int) and v in (-1, 0, 1) for v in state[5:8])
            and all(v is None or (isinstance(v, dict) and not v) for v in state[8:])
        ):
            raise _refuse("numpy dtype state")


def _bool_values(raw: object, count: int) -> np.ndarray:
    if isinstance(raw, pickle.PickleBuffer):
        raw = bytes(raw)
    if not isinstance(raw, (bytes, bytearray)):
        raise _refuse("numpy array data that is not bytes")
    if len(raw) != count:
        raise pickle.UnpicklingError(f"bool array data holds {len(raw)} bytes for {count} values")
    return np.frombuffer(bytes(raw), dtype=np.uint8) != 0


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _refuse("numpy array shape")
    return value


class _BoolArray:
    """Stands in for numpy's _reconstruct(ndarray, (0,), b"b") + BUILD(state) while
    unpickling; the checked state becomes a real array in `.array`."""

    def __init__(self, cls: object, shape: object, typecode: object) -> None:
        if cls is not _NDARRAY_MARK or shape != (0,) or _text(typecode) != "b":
            raise _refuse("numpy array reconstruction")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        # (version, shape, dtype, is_fortran, raw bytes); version is absent in old pickles
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise _refuse("numpy array state")
        shape, dtype, fortran, raw = state
        dims = _shape(shape)
        if not isinstance(dtype, _BoolDtype):
            raise _refuse("numpy array dtype")
        values = _bool_values(raw, int(np.prod(dims, dtype=np.int64)))
        self.array = values.reshape(dims, order="F" if fortran else "C")


class _NdarrayMark:
    """What the global numpy.ndarray resolves to: only usable as _reconstruct's argument."""


_NDARRAY_MARK = _NdarrayMark()


def _frombuffer(buffer: object, dtype: object, shape: object, order: object) -> np.ndarray:
    # Protocol 5 pickles arrays as _frombuffer(buffer, dtype, shape, order).
    if not isinstance(dtype, _BoolDtype):
        raise _refuse("numpy buffer dtype")
    dims = _shape(shape)
    values = _bool_values(buffer, int(np.prod(dims, dtype=np.int64)))
    return values.reshape(dims, order="F" if _text(order) == "F" else "C")


def _bool_scalar(dtype: object, raw: object = b"\x00") -> np.bool_:
    # numpy.bool_ values pickle as scalar(dtype, raw bytes).
    if not isinstance(dtype, _BoolDtype):
        raise _refuse("numpy scalar dtype")
    return np.bool_(_bool_values(raw, 1)[0])


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    # Python 3 writes bytes at protocols < 3 as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse("_codecs.encode other than latin1 text to bytes")
    return text.encode("latin-1")


_ALLOWED = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _BoolArray,
    ("numpy._core.multiarray", "_reconstruct"): _BoolArray,
    ("numpy.core.multiarray", "scalar"): _bool_scalar,
    ("numpy._core.multiarray", "scalar"): _bool_scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY_MARK,
    ("numpy", "dtype"): _BoolDtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _refuse(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids refused")


@dataclass(frozen=True)
class ValidationSet:
    """One `.bin`: 2*N encoded crops and N labels (True: same identity) for pairs (2i, 2i+1)."""

    name: str
    images: list[bytes]
    issame: np.ndarray

    @property
    def pairs(self) -> int:
        return int(self.issame.size)


def _labels(raw: object, where: str) -> np.ndarray:
    if isinstance(raw, _BoolArray) and raw.array is not None:
        raw = raw.array
    if isinstance(raw, np.ndarray):
        if raw.dtype != np.bool_ or raw.ndim != 1:
            raise BinFormatError(f"{where}: issame must be a 1-D bool array, got {raw.dtype}")
        return raw.copy()
    if isinstance(raw, (list, tuple)):
        if not all(isinstance(v, (bool, np.bool_)) for v in raw):
            raise BinFormatError(f"{where}: issame must hold only booleans")
        return np.asarray(raw, dtype=bool)
    raise BinFormatError(f"{where}: issame must be a list or bool array, got {type(raw).__name__}")


def loads_bin(data: bytes, name: str = "<bytes>") -> ValidationSet:
    """Parse the bytes of a `.bin`; BinFormatError (naming `name`) for anything unexpected."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise BinFormatError(f"{name}: not a validation .bin: {e}") from None
    except Exception as e:
        # A truncated or corrupt stream raises whatever the opcode hit (EOFError, ...).
        raise BinFormatError(f"{name}: unreadable pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{name}: expected a pickled (images, issame) pair")
    raw_images, raw_issame = obj
    if not isinstance(raw_images, (list, tuple)):
        raise BinFormatError(f"{name}: images must be a list of encoded crops")
    images: list[bytes] = []
    for i, item in enumerate(raw_images):
        if not isinstance(item, (bytes, bytearray)):
            raise BinFormatError(f"{name}: images[{i}] is {type(item).__name__}, expected bytes")
        images.append(bytes(item))
    issame = _labels(raw_issame, name)
    if len(images) != 2 * issame.size:
        raise BinFormatError(
            f"{name}: {len(images)} images for {issame.size} pairs (need {2 * issame.size})"
        )
    if issame.size == 0:
        raise BinFormatError(f"{name}: no pairs")
    return ValidationSet(name=name, images=images, issame=issame)


def load_bin(path: str | Path) -> ValidationSet:
    """Read an InsightFace `.bin` validation set; its name is the file's stem (e.g. "lfw")."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise BinFormatError(f"{p}: cannot read: {e.strerror or e}") from None
    vs = loads_bin(data, str(p))
    return ValidationSet(name=p.stem, images=vs.images, issame=vs.issame)
