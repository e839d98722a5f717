"""Hands freed heap memory back to the operating system once a burst of traffic is over.

glibc keeps memory that decoding and batching freed in its per-thread arenas, so after an
overload the server's RSS stays hundreds of MiB above its idle size although Python holds
none of it. `malloc_trim(0)` releases it; the server calls it when it has gone idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def _load_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only; musl and macOS lack it
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_trim()


def available() -> bool:
    return _malloc_trim is not None


def trim() -> bool:
    """Returns free heap pages to the OS; True if any were released."""
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))
