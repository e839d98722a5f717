"""The RPC being served, visible to the code below the servicers without passing it around.

The interceptor sets `current_call` when a call arrives; asyncio tasks started while serving
it inherit the value, so the embedding path can check the caller's deadline before it spends
time on work nobody will read.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

from .errors import DeadlineExceeded


@dataclass
class Call:
    method: str
    request_id: str
    started: float  # time.monotonic()
    deadline: float | None  # time.monotonic() by which the caller stops waiting
    caller: str = ""  # token fingerprint, when authenticated


current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "adaface_current_call", default=None
)


def deadline() -> float | None:
    """The current caller's deadline (time.monotonic()), or None without one."""
    call = current_call.get()
    return None if call is None else call.deadline


def check_deadline(stage: str) -> None:
    """Raises DeadlineExceeded when the current caller's deadline has already passed."""
    limit = deadline()
    if limit is not None and time.monotonic() >= limit:
        raise DeadlineExceeded(f"deadline exceeded before {stage}; the work was not done")


def time_left(default: float) -> float:
    """Seconds until the caller's deadline, capped at `default` (which applies without one)."""
    limit = deadline()
    if limit is None:
        return default
    return max(0.0, min(default, limit - time.monotonic()))
