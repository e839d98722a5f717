"""Retries: which statuses are retried, the jittered backoff, and a retried unary call."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from adaface_client.errors import from_rpc_error

__all__ = ["backoff_delay", "call_with_retries"]

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_MAX_BACKOFF_S = 10.0


def backoff_delay(base: float, attempt: int) -> float:
    # Full-range jitter around the exponential step keeps many clients from retrying in step.
    return min(_MAX_BACKOFF_S, base * (2**attempt)) * random.uniform(0.5, 1.5)


def call_with_retries(
    method: Callable[..., Any], request: Any, timeout: float, retries: int, backoff: float
) -> Any:
    """A unary call retried with backoff on UNAVAILABLE / RESOURCE_EXHAUSTED; errors typed."""
    for attempt in itertools.count():
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() in _RETRYABLE and attempt < retries:
                time.sleep(backoff_delay(backoff, attempt))
                continue
            raise from_rpc_error(e) from None
    raise AssertionError("unreachable")
