"""Length-aware batching stays fair: the oldest request's group goes first, and a request of an odd length is
passed over by younger ones at most MAX_PASSES times before it goes in the next batch whatever its length.

Driven through the real AdmissionQueue with made-up arrival times, so every batch follows from the rule alone.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batch_planner import Planner
from service.batch_queue import MAX_PASSES, AdmissionQueue, PendingRequest
from service.batcher import Batcher
from service.modelrepo.config import BatchingPolicy
from service.ragged import RaggedPolicy
from tests.ragged_requests import text_queue


def _dispatch(queue: AdmissionQueue, *, max_padding: float) -> list[PendingRequest]:
    taken, _ = queue.compatible(max_rows=8, by_length=True, max_padding=max_padding)
    queue.remove(taken, count_passes=True)
    return taken


async def test_the_oldest_requests_group_goes_first_and_keeps_to_its_length():
    queue, (a, b, c, d) = text_queue([10, 100, 11, 99])
    assert _dispatch(queue, max_padding=5) == [a, c]  # the oldest, and the young one of its length
    assert b.passed == 1 and d.passed == 0  # b was older than c, which went ahead of it; d was not
    assert _dispatch(queue, max_padding=5) == [b, d]


async def test_once_passed_over_max_passes_times_no_younger_request_goes_ahead():
    # Four older requests of different lengths, then one of an odd length, then a younger partner for each head.
    queue, reqs = text_queue([10, 30, 50, 70, 120, 10, 30, 50, 70])
    heads, odd, young = reqs[:4], reqs[4], reqs[5:]
    batches = []
    while len(queue):
        batches.append(_dispatch(queue, max_padding=5))
    assert batches[0] == [heads[0], young[0]] and batches[1] == [heads[1], young[1]]  # grouping by length holds
    # Passed over twice: the younger partners of 50 and 70 now wait until the odd request has gone, and it is not
    # padded into anyone's batch to get there (that would trade its wait for a run padded 70 tokens longer).
    assert batches[2:] == [[heads[2]], [heads[3]], [odd], [young[2]], [young[3]]]
    assert odd.passed == MAX_PASSES


async def test_without_the_length_aware_count_nothing_is_passed():
    queue, reqs = text_queue([10, 100, 10])
    taken, _ = queue.compatible(max_rows=8, by_length=True, max_padding=0)
    queue.remove(taken)  # the fixed-shape batcher: requests of other shapes are not passed over, just different
    assert [r.passed for r in reqs] == [0, 0, 0]


def test_the_padding_budget_follows_the_runs_own_cpu_once_measured():
    planner = Planner()
    for tokens, wall in [(10, 0.060), (20, 0.070)]:
        planner.cost.observe(tokens, wall)  # 1 ms a token, 50 ms a run of wall time (a busy box's scheduling)
    assert planner.max_padding() == pytest.approx(50.0)
    planner.run_cpu.observe(10, 0.012)
    planner.run_cpu.observe(20, 0.022)
    assert planner.max_padding() == 0.0  # its own CPU measured, but not yet steady: pad nothing meanwhile
    for tokens in (10, 20, 30, 40) * 2:
        planner.run_cpu.observe(tokens, 0.001 * tokens + 0.002)  # the run's own CPU: 1 ms a token, 2 ms a run
    assert planner.max_padding() == pytest.approx(2.0)  # padding pays only for the CPU a shared run gives back


async def test_a_length_aware_batcher_records_each_runs_own_cpu():
    def run(feeds):
        total = 0
        for i in range(300_000):  # CPU in the worker thread, as ONNX Runtime's would be
            total += i
        return {"y": np.zeros((feeds["input_ids"].shape[0], 1), np.float32)}, 0, 0

    b = Batcher(model="m", run=run, executor=ThreadPoolExecutor(1), policy=BatchingPolicy(max_queue_delay_us=0),
                max_batch_size=4, concurrency=1, adaptive=True, ragged=RaggedPolicy(pad_values={"input_ids": 0}))
    b.start()
    x = np.ones((1, 7), np.int64)
    await asyncio.wait_for(b.submit(inputs={"input_ids": x}, rows=1, timeout_s=None), timeout=30)
    [(units, cpu)] = list(b.planner.run_cpu.samples)
    assert units == 7 and cpu > 0.001  # a 300k-step Python loop is several ms of CPU, all off the event loop
    await b.close(grace_s=1)
