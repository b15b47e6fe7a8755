"""Length-aware batches are drawn from the oldest part of the queue (service/length_groups.py WINDOW_SHARE,
MIN_WINDOW): a well-filled group of young requests at the back does not run ahead of the whole queue.

Driven through the real AdmissionQueue with made-up arrival times and lengths, no clock involved.
"""

from __future__ import annotations

from service.batch_queue import AdmissionQueue, PendingRequest
from service.length_groups import MIN_WINDOW, WINDOW_SHARE
from tests.ragged_requests import text_queue


def _dispatch(queue: AdmissionQueue) -> list[PendingRequest]:
    taken, _ = queue.compatible(max_rows=8, by_length=True, max_padding=4)
    queue.remove(taken, count_passes=True)
    return taken


async def test_young_requests_at_the_back_do_not_ride_ahead_of_the_whole_queue():
    # 21 waiting requests of lengths too far apart to share a run, then three young ones of one length at the back.
    queue, reqs = text_queue([10 * (i + 1) for i in range(21)] + [500, 500, 500])
    window = max(MIN_WINDOW, -(-len(reqs) // WINDOW_SHARE))
    assert window == 8
    batches = [_dispatch(queue) for _ in range(16)]
    # Each batch comes from the oldest eight still waiting: a lone old request, in arrival order, while the
    # three-row group of 500s (the best-filled, and first to go when drawn from the whole queue) waits its turn.
    assert batches[:15] == [[r] for r in reqs[:15]]
    # Nine left: the oldest eight hold two of the 500s, now the best-filled group; none ran ahead of more than
    # seven older requests.
    assert batches[15] == reqs[21:23]

async def test_a_short_queue_is_grouped_whole():
    # Up to MIN_WINDOW waiting requests: the best-filled group goes, as before the window.
    queue, reqs = text_queue([50, 60, 70, 80, 90, 100, 10, 10])
    assert _dispatch(queue) == reqs[6:]
