"""DynamicBatcher: coalescing, group integrity, bounded queue, failure fan-out, cancellation."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from adaface_server.batching import DynamicBatcher
from adaface_server.errors import DeadlineExceeded, ResourceExhausted


class GatedModel:
    """An infer function that records batches and runs only when the test opens the gate."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def __call__(self, batch: np.ndarray):
        self.batches.append(batch.copy())
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("model exploded")
        # Deterministic per-row output so the test can check routing.
        emb = np.repeat(batch[:, :1], 4, axis=1)
        return emb, batch[:, :1] * 10


def rows(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).reshape(-1, 1)


def run(coro):
    return asyncio.run(coro)


def test_idle_model_runs_a_lone_request_at_once_then_coalesces_the_backlog():
    async def scenario():
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue=64)
        batcher.start()
        first = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.01)
        assert len(model.batches) == 1  # no waiting for company while the model is idle
        later = [asyncio.create_task(batcher.submit(rows(10 + i))) for i in range(5)]
        await asyncio.sleep(0.01)
        assert batcher.queued_rows == 5
        model.gate.set()
        results = await asyncio.gather(first, *later)
        await batcher.stop()
        return model, results

    model, results = run(scenario())
    assert [len(b) for b in model.batches] == [1, 5]
    for value, (emb, norm) in zip([1, 10, 11, 12, 13, 14], results, strict=True):
        assert emb.shape == (1, 4) and np.all(emb == value)
        assert norm[0, 0] == value * 10


def test_batches_respect_max_batch_size_and_keep_groups_whole():
    async def scenario():
        model = GatedModel()
        model.gate.set()
        batcher = DynamicBatcher(model, max_batch_size=5, max_queue=64)
        batcher.start()
        a = rows(*range(6))  # three groups of two
        b = rows(*range(100, 104))
        out = await asyncio.gather(batcher.submit(a, group=2), batcher.submit(b, group=2))
        await batcher.stop()
        return model, out, a, b

    model, (ra, rb), a, b = run(scenario())
    assert all(len(batch) <= 5 for batch in model.batches)
    for batch in model.batches:
        values = batch[:, 0]
        # pairs are consecutive values starting at an even offset of their request
        assert len(values) % 2 == 0
    np.testing.assert_array_equal(ra[0][:, 0], a[:, 0])
    np.testing.assert_array_equal(rb[0][:, 0], b[:, 0])


def test_full_queue_is_refused_at_once_with_the_limit_named():
    async def scenario():
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=2, max_queue=3)
        batcher.start()
        running = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher.submit(rows(2, 3)))
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted) as err:
            await batcher.submit(rows(4, 5))
        model.gate.set()
        await asyncio.gather(running, queued)
        await batcher.stop()
        return str(err.value)

    message = run(scenario())
    assert "2 images queued" in message and "limit of 3" in message and "max_queue" in message


def test_a_failed_batch_fails_every_request_in_it_and_the_batcher_keeps_going():
    async def scenario():
        model = GatedModel(fail=True)
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue=64)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit(rows(0)))
        await asyncio.sleep(0.01)
        waiters = [asyncio.create_task(batcher.submit(rows(i))) for i in range(1, 4)]
        await asyncio.sleep(0.01)
        model.gate.set()
        outcomes = await asyncio.gather(blocker, *waiters, return_exceptions=True)
        model.fail = False
        after = await batcher.submit(rows(7))
        await batcher.stop()
        return outcomes, after

    outcomes, after = run(scenario())
    assert all(isinstance(o, RuntimeError) and "exploded" in str(o) for o in outcomes)
    assert after[1][0, 0] == 70


def test_cancelled_request_is_dropped_before_it_reaches_the_model():
    async def scenario():
        model = GatedModel()
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue=64)
        batcher.start()
        blocker = asyncio.create_task(batcher.submit(rows(0)))
        await asyncio.sleep(0.01)
        doomed = asyncio.create_task(batcher.submit(rows(1, 2)))
        kept = asyncio.create_task(batcher.submit(rows(3)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.sleep(0.01)
        assert batcher.queued_rows == 1
        model.gate.set()
        await asyncio.gather(blocker, kept)
        await batcher.stop()
        return model

    model = run(scenario())
    assert [b[:, 0].tolist() for b in model.batches] == [[0.0], [3.0]]


def test_rows_whose_deadline_passed_while_queued_are_dropped_unrun():
    async def scenario():
        model = GatedModel()
        dropped: list[int] = []
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue=64, on_drop=dropped.append)
        batcher.start()
        busy = asyncio.create_task(batcher.submit(rows(1)))
        await asyncio.sleep(0.01)
        now = time.monotonic()
        # Everything queued behind the busy batch expires before the model frees up.
        expired = [
            asyncio.create_task(batcher.submit(rows(2, 3), deadline=now + 0.02)),
            asyncio.create_task(batcher.submit(rows(4), deadline=now + 0.02)),
        ]
        await asyncio.sleep(0.05)
        model.gate.set()
        await busy
        outcomes = await asyncio.gather(*expired, return_exceptions=True)
        # The batcher survived a batch with nothing left in it and still serves.
        later = await batcher.submit(rows(5), deadline=time.monotonic() + 10)
        await batcher.stop()
        return model, dropped, outcomes, later, batcher

    model, dropped, outcomes, later, batcher = run(scenario())
    assert [len(b) for b in model.batches] == [1, 1]
    assert all(isinstance(o, DeadlineExceeded) for o in outcomes), outcomes
    assert dropped == [2, 1] and batcher.rows_dropped == 3 and batcher.queued_rows == 0
    assert later[0][0, 0] == 5
