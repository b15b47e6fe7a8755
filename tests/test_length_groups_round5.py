"""Length-aware batching, round 5 (service/length_groups.py): the oldest waiting request always goes next, with
the near lengths among the oldest quarter of the queue (at least MIN_WINDOW) as its batch-mates.

Driven through the real AdmissionQueue (and once through the real Batcher) with made-up arrival times and lengths,
and the closed loop of loadtests/ragged_sim.py in virtual time: every batch follows from the rule, no clock.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from loadtests.ragged_sim import closed_loop
from service.batch_queue import AdmissionQueue, PendingRequest
from service.batcher import Batcher
from service.length_groups import MIN_WINDOW, WINDOW_SHARE
from service.modelrepo.config import BatchingPolicy
from service.ragged import RaggedPolicy
from tests.ragged_requests import text_queue, text_request
from tests.test_adaptive_batching import TickingClock, masked_run, tokens
from tests.test_batcher import HUGE_DELAY_US


def _dispatch(queue: AdmissionQueue, *, max_padding: float | None, max_rows: int = 8) -> list[PendingRequest]:
    taken, rows = queue.compatible(max_rows=max_rows, by_length=True, max_padding=max_padding)
    assert rows == len(taken)
    queue.remove(taken)
    return taken


async def test_the_oldest_request_goes_next_even_when_younger_ones_would_fill_a_batch():
    queue, (old, *_) = text_queue([50, 10, 10, 10, 10, 10, 10, 10])
    # Round 3/4 sent the seven 10s first (the best-filled group); now the oldest is never passed over.
    assert _dispatch(queue, max_padding=4) == [old]
    # Then the 10s, the oldest quarter of the queue (at least two) at a time.
    assert [len(_dispatch(queue, max_padding=4)) for _ in range(4)] == [2, 2, 2, 1]


async def test_the_oldest_requests_group_is_filled_from_the_front_of_the_queue():
    # Sixteen waiting: the window is the oldest four. Its near lengths all ride (each pads within the budget) ...
    queue, reqs = text_queue([12, 10, 13, 11] + [12] * 12)
    assert max(MIN_WINDOW, -(-16 // WINDOW_SHARE)) == 4
    assert _dispatch(queue, max_padding=4) == reqs[:4]
    # ... but not a request of the same length from further back: riders from behind the window went ahead of
    # every request they passed, which is what made the tail (docs/BENCHMARKS.md "Length-aware text, round 5").
    queue, reqs = text_queue([12, 90, 91, 92] + [70] * 11 + [12])
    assert _dispatch(queue, max_padding=4) == [reqs[0]]


async def test_a_request_never_waits_behind_a_younger_one_of_another_length_for_long():
    # A closed loop of 32: nine texts in ten short, so groups of short ones are always at hand. Every request is
    # served within as many batches as there were requests ahead of it when it arrived (first-come-first-served's
    # bound), and the short ones still share runs.
    rng = np.random.default_rng(0)
    queue = AdmissionQueue(max_size=0)
    batches, served, arrivals = 0, 0, 0
    bound: dict[int, int] = {}  # id -> the last batch number it may be served in
    for _ in range(32):
        bound, arrivals = _arrive(queue, rng, bound=bound, batches=batches, at=arrivals)
    while served < 600:
        taken = _dispatch(queue, max_padding=6, max_rows=32)
        batches += 1
        served += len(taken)
        for r in taken:
            assert batches <= bound.pop(id(r))
            bound, arrivals = _arrive(queue, rng, bound=bound, batches=batches, at=arrivals)
    assert served / batches > 1.5  # shared runs: plain equal-length batching forms ~1.3 here


def _arrive(queue: AdmissionQueue, rng: np.random.Generator, *, bound: dict[int, int], batches: int,
            at: int) -> tuple[dict[int, int], int]:
    length = int(rng.integers(100, 119)) if rng.random() < 0.1 else int(rng.integers(5, 21))
    req = text_request(length=length, at=float(at))
    bound[id(req)] = batches + len(queue) + 1  # each batch takes the oldest: one batch per request ahead, at most
    queue.put(req, model="text")
    return bound, at + 1


async def test_without_a_padding_budget_the_oldest_go_together_up_to_the_bounds():
    # No budget (a length-aware model without the adaptive planner): any lengths stack, as in Triton's FIFO.
    queue, reqs = text_queue([50, 10, 90, 20, 60, 30])
    assert _dispatch(queue, max_padding=None, max_rows=8) == reqs
    queue, reqs = text_queue([3, 9, 2, 8])
    assert _dispatch(queue, max_padding=None, max_rows=2) == [reqs[0], reqs[2]]  # the oldest's nearest lengths


@pytest.mark.parametrize("clients", [8, 16, 32])
async def test_in_virtual_time_the_tail_is_no_longer_than_equal_length_batchings(clients):
    # loadtests/ragged_sim.py's closed loop through the real queue: 3 ms a run plus 180 us a padded token.
    common = {"texts": 480, "clients": clients, "seed": 0, "a_s": 180e-6, "b_s": 3e-3}
    plain = await closed_loop(by_length=False, **common)
    grouped = await closed_loop(by_length=True, **common)
    assert grouped.p99_ms <= plain.p99_ms
    assert grouped.rows_per_s >= plain.rows_per_s and grouped.mean_batch > plain.mean_batch


async def test_batches_of_the_new_rule_answer_exactly_what_each_request_alone_would():
    seen = []

    def run(feeds):
        seen.append(feeds["input_ids"].shape)
        return masked_run(feeds)

    ragged = RaggedPolicy(pad_values={"input_ids": 0, "attention_mask": 0}, outputs=("tokens",))
    policy = BatchingPolicy(max_queue_delay_us=HUGE_DELAY_US)
    b = Batcher(model="m", run=run, executor=ThreadPoolExecutor(1), policy=policy, max_batch_size=4, concurrency=1,
                clock=TickingClock(), adaptive=True, ragged=ragged)
    for tokens_, seconds in [(10, 0.015), (20, 0.025)]:
        b.planner.cost.observe(tokens_, seconds)  # 1 ms a token plus 5 ms a run: 5 padding tokens are worth a run
    b.start()
    lengths = [10, 12, 30, 11]
    # All four are queued before the collector first runs (no await in between).
    futs = [b.submit(inputs=tokens(list(range(1, n + 1))), rows=1, timeout_s=None) for n in lengths]
    results = await asyncio.wait_for(asyncio.gather(*futs), timeout=10)
    # The oldest two form the window: 10 and 12 share a padded run; 11 would fit their budget but waits behind the
    # window. (After that first run the budget is 0 until the run's own CPU is steady: the rest run alone.)
    assert seen == [(2, 12), (1, 30), (1, 11)]
    for n, r in zip(lengths, results):
        alone, _, _ = masked_run(tokens(list(range(1, n + 1))))
        np.testing.assert_allclose(r.outputs["mean"], alone["mean"], atol=1e-5)
        np.testing.assert_array_equal(r.outputs["tokens"], alone["tokens"])  # cut back to its own length
    await b.close(grace_s=1)
