"""Made-up waiting text requests for the length-aware queue tests (tests/test_ragged_fairness.py,
tests/test_ragged_grouping.py): one row each, an [1, L] `input_ids`, enqueued at the given time."""

from __future__ import annotations

import asyncio

import numpy as np

from service.batch_queue import AdmissionQueue, PendingRequest

SHAPE = (("input_ids", (), "<i8"),)  # what a ragged policy's shape_key leaves of a [1, L] input: lengths differ


def text_request(*, length: int, at: float) -> PendingRequest:
    return PendingRequest(inputs={"input_ids": np.zeros((1, length), np.int64)}, rows=1, shape_key=SHAPE,
                          future=asyncio.get_running_loop().create_future(), enqueued=at, length=length)


def text_queue(lengths: list[int]) -> tuple[AdmissionQueue, list[PendingRequest]]:
    """A queue holding one request per length, enqueued at 0, 1, 2, ... in that order."""
    queue = AdmissionQueue(max_size=0)
    reqs = [text_request(length=n, at=float(i)) for i, n in enumerate(lengths)]
    for r in reqs:
        queue.put(r, model="text")
    return queue, reqs
