"""Length-aware batching stays fair: the oldest request's group goes first, and a request of an odd length is
passed over by younger ones at most MAX_PASSES times before it goes in the next batch whatever its length.

Driven through the real AdmissionQueue with made-up arrival times, so every batch follows from the rule alone.
"""

from __future__ import annotations

import asyncio

import numpy as np

from service.batch_queue import MAX_PASSES, AdmissionQueue, PendingRequest

SHAPE = (("input_ids", (), "<i8"),)  # what a ragged policy's shape_key leaves of a [1, L] input: lengths differ


def _request(*, length: int, at: float) -> PendingRequest:
    x = np.zeros((1, length), np.int64)
    return PendingRequest(inputs={"input_ids": x}, rows=1, shape_key=SHAPE,
                          future=asyncio.get_running_loop().create_future(), enqueued=at, length=length)


def _queue(lengths: list[int]) -> tuple[AdmissionQueue, list[PendingRequest]]:
    queue = AdmissionQueue(max_size=0)
    reqs = [_request(length=n, at=float(i)) for i, n in enumerate(lengths)]
    for r in reqs:
        queue.put(r, model="text")
    return queue, reqs


def _dispatch(queue: AdmissionQueue, *, max_padding: float) -> list[PendingRequest]:
    taken, _ = queue.compatible(max_rows=8, by_length=True, max_padding=max_padding)
    queue.remove(taken, count_passes=True)
    return taken


async def test_the_oldest_requests_group_goes_first_and_keeps_to_its_length():
    queue, (a, b, c, d) = _queue([10, 100, 11, 99])
    assert _dispatch(queue, max_padding=5) == [a, c]  # the oldest, and the young one of its length
    assert b.passed == 1 and d.passed == 0  # b was older than c, which went ahead of it; d was not
    assert _dispatch(queue, max_padding=5) == [b, d]


async def test_an_odd_length_is_passed_over_at_most_max_passes_times():
    # Four older requests of different lengths, then one of an odd length, then a younger partner for each head.
    queue, reqs = _queue([10, 30, 50, 70, 120, 10, 30, 50, 70])
    heads, odd = reqs[:4], reqs[4]
    batches = []
    while len(queue):
        batches.append(_dispatch(queue, max_padding=5))
    assert batches[0] == [heads[0], reqs[5]] and batches[1] == [heads[1], reqs[6]]  # grouping by length holds
    # Passed over twice, the odd request (and the head passed with it) now goes, padding or not.
    assert batches[2] == [heads[2], heads[3], odd]
    assert max(r.passed for r in reqs) == MAX_PASSES
    assert [r for batch in batches for r in batch if r.passed > MAX_PASSES] == []


async def test_without_the_length_aware_count_nothing_is_passed():
    queue, reqs = _queue([10, 100, 10])
    taken, _ = queue.compatible(max_rows=8, by_length=True, max_padding=0)
    queue.remove(taken)  # the fixed-shape batcher: requests of other shapes are not passed over, just different
    assert [r.passed for r in reqs] == [0, 0, 0]
