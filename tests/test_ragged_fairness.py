"""Length-aware batching stays fair: the oldest request's group goes first and keeps to its length (and, since
round 5, nothing goes before the oldest request: tests/test_length_groups_round5.py), and the padding budget
follows each run's own CPU.

Driven through the real AdmissionQueue with made-up arrival times, so every batch follows from the rule alone.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batch_planner import Planner
from service.batch_queue import AdmissionQueue, PendingRequest
from service.batcher import Batcher
from service.modelrepo.config import BatchingPolicy
from service.ragged import RaggedPolicy
from tests.ragged_requests import text_queue


def _dispatch(queue: AdmissionQueue, *, max_padding: float) -> list[PendingRequest]:
    taken, _ = queue.compatible(max_rows=8, by_length=True, max_padding=max_padding)
    queue.remove(taken)
    return taken


async def test_the_oldest_requests_group_goes_first_and_keeps_to_its_length():
    queue, (a, b, c, d) = text_queue([10, 11, 100, 99])
    assert _dispatch(queue, max_padding=5) == [a, b]  # the oldest, and the next one of its length; 100 not padded in
    assert _dispatch(queue, max_padding=5) == [c, d]


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
