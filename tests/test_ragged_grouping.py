"""Length-aware grouping (service/length_groups.py): the waiting requests are cut into groups by sorted length,
the best-filled group goes first, and a request passed over MAX_PASSES times still goes, sharing its run only
with other overdue requests.

Driven through the real AdmissionQueue (and once through the real Batcher) with made-up arrival times and lengths:
every batch follows from the rules alone, no clock or timing is involved.
"""

from __future__ import annotations

import numpy as np

from service.batch_queue import MAX_PASSES, AdmissionQueue, PendingRequest
from service.length_groups import length_groups
from tests.ragged_requests import text_queue, text_request


def _dispatch(queue: AdmissionQueue, *, max_padding: float, max_rows: int = 8,
              max_tokens: int = 0) -> list[PendingRequest]:
    taken, rows = queue.compatible(max_rows=max_rows, by_length=True, max_padding=max_padding, max_tokens=max_tokens)
    assert rows == sum(r.rows for r in taken)
    queue.remove(taken, count_passes=True)
    return taken


async def test_groups_follow_sorted_length_and_the_padding_budget():
    _, reqs = text_queue([40, 10, 12, 13, 41, 90])
    groups = length_groups(reqs, max_rows=8, max_padding=4)
    # 10 -> 12 pads one row by 2; 13 pads two rows by 1; 40 would pad three rows by 27: a new group.
    assert [[r.length for r in g.members] for g in groups] == [[10, 12, 13], [40, 41], [90]]
    assert [g.rows for g in groups] == [3, 2, 1]


async def test_no_budget_yet_stacks_equal_lengths_only():
    _, reqs = text_queue([10, 11, 10, 11])
    groups = length_groups(reqs, max_rows=8, max_padding=0)
    assert [[r.length for r in g.members] for g in groups] == [[10, 10], [11, 11]]


async def test_the_best_filled_group_goes_before_the_oldest_requests_lone_one():
    queue, (old, a, b, c) = text_queue([50, 10, 11, 12])
    assert _dispatch(queue, max_padding=4) == [a, b, c]  # three rows in one run, in arrival order
    assert old.passed == 1  # younger requests went ahead of it: counted
    assert _dispatch(queue, max_padding=4) == [old]


async def test_between_equally_filled_groups_the_oldest_requests_goes():
    queue, (a, b, c, d) = text_queue([90, 10, 91, 11])
    assert _dispatch(queue, max_padding=4) == [a, c]
    assert (b.passed, d.passed) == (1, 0)  # c, younger than b, went ahead of it; nothing younger than d went
    assert _dispatch(queue, max_padding=4) == [b, d]


async def test_a_request_passed_over_twice_goes_next_and_shares_its_run_only_with_overdue_ones():
    # An odd length (70) waits while pairs of other lengths keep forming around it.
    queue, reqs = text_queue([70, 10, 10, 20, 20])
    odd = reqs[0]
    assert _dispatch(queue, max_padding=4) == reqs[1:3]
    assert _dispatch(queue, max_padding=4) == reqs[3:5]
    assert odd.passed == MAX_PASSES
    younger = [text_request(length=70, at=10.0 + i) for i in range(3)]  # a better-filled group of its length forms
    for r in younger:
        queue.put(r, model="text")
    # Overdue: it goes now, and the younger 70s (not overdue) do not ride along, so none go ahead of it.
    assert _dispatch(queue, max_padding=4) == [odd]
    assert _dispatch(queue, max_padding=4) == younger


async def test_overdue_requests_of_near_lengths_share_a_run():
    queue, reqs = text_queue([70, 30, 72, 10, 10, 10, 20, 20, 20])
    assert _dispatch(queue, max_padding=4) == reqs[3:6]
    assert _dispatch(queue, max_padding=4) == reqs[6:9]
    assert [r.passed for r in reqs[:3]] == [MAX_PASSES] * 3
    assert _dispatch(queue, max_padding=4) == [reqs[0], reqs[2]]  # 70 and 72: one run, padded by 2
    assert _dispatch(queue, max_padding=4) == [reqs[1]]


async def test_a_group_cut_by_the_token_bound_is_reported_full():
    queue, _ = text_queue([10, 10, 10])
    _, rows = queue.compatible(max_rows=8, by_length=True, max_padding=0, max_tokens=20)
    assert rows == 2 and queue.token_bound_hit  # a third row of 10 tokens would make 30 > 20
    queue, _ = text_queue([10, 10])
    queue.compatible(max_rows=8, by_length=True, max_padding=0, max_tokens=20)
    assert not queue.token_bound_hit


async def test_in_a_closed_loop_long_texts_are_not_starved_by_groups_of_short_ones():
    rng = np.random.default_rng(0)
    queue = AdmissionQueue(max_size=0)
    clients, served, batches = 32, 0, 0
    arrived_at_batch: list[int] = []  # arrival number -> batches dispatched when it arrived
    waiting: list[PendingRequest] = []
    waits = []

    def arrive() -> None:
        # Nine texts in ten are short, so groups of short ones are nearly always the best-filled.
        length = int(rng.integers(100, 119)) if rng.random() < 0.1 else int(rng.integers(5, 21))
        r = text_request(length=length, at=float(served + len(waiting)))
        # Arrival number, not id(r): ids of answered requests are reused, which made this depend on the allocator.
        r.enqueued = float(len(arrived_at_batch))  # arrival order
        arrived_at_batch.append(batches)
        waiting.append(r)
        queue.put(r, model="text")

    for _ in range(clients):
        arrive()
    while served < 600:
        overdue_before = any(r.passed >= MAX_PASSES for r in waiting)
        taken = _dispatch(queue, max_padding=6)
        if overdue_before:
            assert all(r.passed >= MAX_PASSES for r in taken)  # nothing younger than an overdue request goes
        batches += 1
        served += len(taken)
        for r in taken:
            waiting.remove(r)
            waits.append(batches - arrived_at_batch[int(r.enqueued)])
            arrive()  # each answered client sends its next text
    assert served / batches > 3  # padding within 6 tokens stacks the short texts
    # A request is passed over at most MAX_PASSES times; after that only requests at least as overdue go before
    # it. Here the longest wait is 14 batches; without the pass bound a long text waited 48.
    assert max(waits) <= clients
