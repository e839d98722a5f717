"""Long computations in a thread pool that stop when their caller is gone.

The computation gets a `should_stop` callable and asks it between chunks of work (kNN tiles,
gallery chunks, import records). When the awaiting task is cancelled (its caller left, its
deadline passed, the server is stopping), `should_stop` starts answering True and the task
waits until the computation has really returned: a pool thread, a build slot and the memory
they hold are never kept by work nobody will receive."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")
StopCheck = Callable[[], bool]


async def until_stopped(
    pool: Executor,
    work: Callable[[StopCheck], T],
    running: set[threading.Event] | None = None,
    when_stopped: Callable[[BaseException], None] | None = None,
) -> T:
    """`work(should_stop)` in `pool`. On cancellation: stops the work, waits until it has
    returned, hands what it raised (its Stopped, say) to `when_stopped`, and lets the
    cancellation go on. `running`, when given, holds the stop event while the work runs, so
    a closing service can stop everything at once."""
    stop = threading.Event()
    if running is not None:
        running.add(stop)
    future = asyncio.get_running_loop().run_in_executor(pool, work, stop.is_set)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        error = None if future.cancelled() else future.exception()  # retrieved either way
        if error is not None and when_stopped is not None:
            when_stopped(error)
        raise
    finally:
        if running is not None:
            running.discard(stop)
