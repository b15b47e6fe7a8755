"""Event-gated batcher tests: no HTTP, no sleeps to wait for state, a huge delay where timing would matter."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher
from service.errors import BackendError, DeadlineExceeded, QueueFull, RequestCancelled
from service.modelrepo.config import BatchingPolicy

HUGE_DELAY_US = 60_000_000  # a minute: a batch that forms did so because of size, not time


class GatedModel:
    """A fake model run in a worker thread; `gate` holds every run until the test opens it."""

    def __init__(self, *, gated: bool = False) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Event()
        self.batches: list[np.ndarray] = []

    def __call__(self, feeds):
        x = feeds["x"]
        self.batches.append(x.copy())
        self.started.set()
        self.gate.wait(30)
        if (x < 0).any():
            raise RuntimeError("negative input")
        return {"y": x * 2}, 0, 0


def make_batcher(model, *, max_batch_size=8, preferred=(), max_queue_size=0, delay_us=HUGE_DELAY_US, concurrency=1):
    policy = BatchingPolicy(preferred_batch_sizes=tuple(preferred), max_queue_delay_us=delay_us,
                            max_queue_size=max_queue_size)
    b = Batcher(model="m", run=model, executor=ThreadPoolExecutor(concurrency), policy=policy,
                max_batch_size=max_batch_size, concurrency=concurrency)
    b.start()
    return b


def submit(b: Batcher, value: float, *, rows: int = 1, width: int = 3, timeout_s=None) -> asyncio.Future:
    return b.submit(inputs={"x": np.full((rows, width), value, np.float32)}, rows=rows, timeout_s=timeout_s)


async def until(condition, what: str) -> None:
    """Yield to the loop until condition holds (bounded)."""
    for _ in range(20_000):
        if condition():
            return
        await asyncio.sleep(0.0005)
    raise AssertionError(f"never happened: {what}")


async def test_batch_forms_at_preferred_size_without_waiting_the_delay():
    model = GatedModel()
    b = make_batcher(model, preferred=[4])
    futs = [submit(b, i) for i in range(4)]
    results = await asyncio.wait_for(asyncio.gather(*futs), timeout=10)
    assert [len(x) for x in model.batches] == [4]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["y"], np.full((1, 3), 2 * i))
        assert r.batch_rows == 4
    await b.close(grace_s=1)


async def test_multi_row_requests_count_as_rows_up_to_max_batch_size():
    model = GatedModel()
    b = make_batcher(model, max_batch_size=5)
    futs = [submit(b, 1, rows=2), submit(b, 2, rows=3), submit(b, 3, rows=2)]
    results = await asyncio.wait_for(asyncio.gather(*futs[:2]), timeout=10)
    assert [r.outputs["y"].shape[0] for r in results] == [2, 3]
    assert [len(x) for x in model.batches] == [5]
    futs[2].cancel()
    await b.close(grace_s=1)


async def test_delay_bounds_waiting_for_a_fuller_batch():
    model = GatedModel()
    b = make_batcher(model, delay_us=20_000)  # 20 ms, max_batch_size 8: only two requests ever come
    results = await asyncio.wait_for(asyncio.gather(submit(b, 1), submit(b, 2)), timeout=10)
    assert [len(x) for x in model.batches] == [2] and len(results) == 2
    await b.close(grace_s=1)


async def test_full_queue_rejects():
    model = GatedModel(gated=True)
    b = make_batcher(model, max_queue_size=2, max_batch_size=1)
    first = submit(b, 0)
    await until(model.started.is_set, "first request running")
    queued = [submit(b, 1), submit(b, 2)]
    with pytest.raises(QueueFull, match=r"^Exceeds maximum queue size: .*queue is full"):
        submit(b, 3)
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *queued), timeout=10)
    await b.close(grace_s=1)


async def test_cancelled_callers_are_skipped_before_compute():
    model = GatedModel(gated=True)
    b = make_batcher(model, max_batch_size=8, preferred=[2])
    first = submit(b, 0, rows=2)
    await until(model.started.is_set, "first batch running")
    gone, kept = submit(b, -1), submit(b, 5, rows=2)  # -1 would make the model fail if it ever ran
    gone.cancel()
    model.gate.set()
    result = await asyncio.wait_for(kept, timeout=10)
    await first
    np.testing.assert_array_equal(result.outputs["y"], np.full((2, 3), 10.0))
    assert all((batch >= 0).all() for batch in model.batches), "a cancelled request reached the model"
    await b.close(grace_s=1)


async def test_request_whose_deadline_passes_in_queue_is_never_run():
    model = GatedModel(gated=True)
    b = make_batcher(model, max_batch_size=1)
    first = submit(b, 0)
    await until(model.started.is_set, "first request running")
    late = submit(b, -1, timeout_s=0.001)
    with pytest.raises(DeadlineExceeded, match="timed out in the queue"):
        await asyncio.wait_for(late, timeout=10)
    assert len(b.queue) == 0
    model.gate.set()
    await first
    assert len(model.batches) == 1
    await b.close(grace_s=1)


async def test_one_failing_request_fails_alone():
    model = GatedModel(gated=True)
    b = make_batcher(model, preferred=[3])
    futs = [submit(b, 1), submit(b, -1), submit(b, 2)]
    model.gate.set()
    done = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), timeout=10)
    assert isinstance(done[1], BackendError) and "negative input" in str(done[1])
    np.testing.assert_array_equal(done[0].outputs["y"], np.full((1, 3), 2.0))
    np.testing.assert_array_equal(done[2].outputs["y"], np.full((1, 3), 4.0))
    await b.close(grace_s=1)


async def test_requests_with_other_non_batch_dims_are_never_stacked():
    model = GatedModel(gated=True)
    b = make_batcher(model, preferred=[2])
    blocker = submit(b, 0, rows=2)
    await until(model.started.is_set, "blocker running")
    futs = [submit(b, 1, width=3), submit(b, 2, width=5), submit(b, 3, width=3), submit(b, 4, width=5)]
    model.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*futs), timeout=10)
    await blocker
    assert sorted(x.shape for x in model.batches[1:]) == [(2, 3), (2, 5)]
    assert [r.outputs["y"].shape[1] for r in results] == [3, 5, 3, 5]
    await b.close(grace_s=1)


async def test_output_rows_mismatch_fails_the_batch_loudly():
    def wrong(feeds):
        return {"y": np.zeros((1, 3), np.float32)}, 0, 0

    b = make_batcher(wrong, preferred=[2])
    done = await asyncio.wait_for(asyncio.gather(submit(b, 1), submit(b, 2), return_exceptions=True), timeout=10)
    assert all(isinstance(d, BackendError) and "first axis must be the batch axis" in str(d) for d in done)
    await b.close(grace_s=1)


async def test_a_full_preferred_batch_is_not_topped_up():
    model = GatedModel(gated=True)
    b = make_batcher(model, preferred=[2], delay_us=20_000)
    blocker = submit(b, 0, rows=2)
    await until(model.started.is_set, "blocker running")
    futs = [submit(b, i) for i in (1, 2, 3)]
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *futs), timeout=10)
    assert [len(x) for x in model.batches] == [2, 2, 1]
    await b.close(grace_s=1)


async def test_callers_who_hung_up_are_dropped_when_the_batch_forms():
    model = GatedModel(gated=True)
    b = make_batcher(model, preferred=[2])
    blocker = submit(b, 0, rows=2)
    await until(model.started.is_set, "blocker running")
    hung_up = {"yes": False}
    gone = b.submit(inputs={"x": np.full((1, 3), -1, np.float32)}, rows=1, timeout_s=None,
                    client_gone=lambda: hung_up["yes"])
    kept = submit(b, 5, rows=2)
    hung_up["yes"] = True  # the client leaves while its request waits
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, kept), timeout=10)
    with pytest.raises(RequestCancelled, match="client went away"):
        await gone
    assert all((batch >= 0).all() for batch in model.batches), "a hung-up caller's request reached the model"
    await b.close(grace_s=1)


async def test_a_cancelled_caller_leaves_the_queue_and_its_depth_at_once():
    # The depth feeds nv_inference_pending_request_count: a cancelled caller used to count until the next batch
    # formed (here, with a minute's delay and no batch-mates, not for a minute).
    model = GatedModel()
    depths: list[int] = []
    b = make_batcher(model, max_batch_size=8)
    b.stats.on_queue_change = depths.append
    gone, kept = submit(b, -1), submit(b, 1)
    await until(lambda: depths[-1:] == [2], "both queued")
    gone.cancel()
    await asyncio.sleep(0)  # the cancelled future's callbacks run on the next loop step
    assert depths[-1] == 1 and len(b.queue) == 1
    kept.cancel()
    await asyncio.sleep(0)
    assert depths[-1] == 0 and len(b.queue) == 0 and model.batches == []
    await b.close(grace_s=1)


async def test_priority_levels_serve_the_more_urgent_level_first_fifo_within_a_level():
    # Triton's dynamic_batching priority_levels: level 1 before level 2, each level in arrival order.
    model = GatedModel(gated=True)
    policy = BatchingPolicy(max_queue_delay_us=HUGE_DELAY_US, priority_levels=2, default_priority_level=2)
    b = Batcher(model="m", run=model, executor=ThreadPoolExecutor(1), policy=policy, max_batch_size=1, concurrency=1)
    b.start()
    blocker = submit(b, 0)
    await until(model.started.is_set, "blocker running")
    order = [(1.0, 2), (2.0, 2), (3.0, 1), (4.0, 2), (5.0, 1)]  # (value, level)
    futures = [b.submit(inputs={"x": np.full((1, 3), v, np.float32)}, rows=1, timeout_s=None, priority=level)
               for v, level in order]
    assert [r.priority for r in b.queue._items] == [1, 1, 2, 2, 2]
    model.gate.set()
    await asyncio.wait_for(asyncio.gather(blocker, *futures), timeout=10)
    assert [float(batch[0, 0]) for batch in model.batches] == [0.0, 3.0, 5.0, 1.0, 2.0, 4.0]
    await b.close(grace_s=1)
