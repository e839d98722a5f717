"""Bounded concurrent handling of a request stream, answered in completion order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def concurrent_responses(
    requests: AsyncIterable[Req], handle: Callable[[Req], Awaitable[Resp]], limit: int
) -> AsyncIterator[Resp]:
    """Runs `handle` on up to `limit` requests at once and yields each response as it is ready.

    `handle` must turn its own failures into responses. A slot is released only when its
    response has been taken by the caller, so a client that stops reading stops the server
    from taking more of its requests.
    """
    window = asyncio.Semaphore(limit)
    done: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def run(request: Req) -> None:
        await done.put(await handle(request))

    async def read() -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in requests:
                await window.acquire()
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await done.put(finished)

    reader = asyncio.create_task(read())
    try:
        while (item := await done.get()) is not finished:
            yield item
            window.release()
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
