"""Length-aware batching: which waiting requests of different lengths run together, and which group goes next.

The oldest waiting request always goes next, and its batch-mates come from the oldest part of the queue only
(WINDOW_SHARE of it, at least MIN_WINDOW requests): those requests are sorted by length and cut into groups (a
request joins the group of the shorter ones before it while the padding it adds, the group's rows padded up to
its length, stays within the budget: the planner's `b / a`, the tokens one run's fixed cost pays for; and within
max_rows and the token bound), and the group holding the oldest request is the batch.

So a request waits at most one batch per request ahead of it on arrival (each batch takes the oldest), only
requests near the front ride along, and no request of an odd length can be passed over for long. Round 3 took the
best-filled group of the whole queue and round 4 of its oldest third (at least 8), bounding passes with an overdue
rule: young requests riding in well-filled groups from further back pushed the ones they passed into the tail
(p99 above plain batching at queues of 8-16 in loadtests/ragged_sim.py; docs/BENCHMARKS.md "Length-aware text,
round 5").

Hand-written: the grouping is a linear pass over a sorted list; no library offers a batching policy to take it from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # batch_queue imports this module; the type is only needed for annotations
    from service.batch_queue import PendingRequest

# The oldest request's batch-mates come from the oldest 1/WINDOW_SHARE of the waiting requests, and from at least
# MIN_WINDOW of them. A quarter, at least 2, kept the p99 of closed loops of 8, 16, 32 and 64 clients below
# equal-length batching's at every fixed run cost simulated (loadtests/ragged_sim.py: 1-12 ms, 6 seeds), with
# rows/s above it (or within 0.4 % at 1 ms); a third went above plain's p99 at 5 of those 16 points, round 4's
# best-filled group of the oldest third (at least 8) at 8, first-come-first-served under the budget (TGI's and
# vLLM's way) at 4, with fewer rows/s than plain at 1-3 ms and 32-64 clients.
WINDOW_SHARE = 4
MIN_WINDOW = 2


@dataclass
class Group:
    """Requests of neighbouring lengths that run as one padded batch."""

    members: list[PendingRequest] = field(default_factory=list)
    rows: int = 0
    longest: int = 0
    at_token_bound: bool = False  # the next longer request did not fit in max_tokens: as full as it gets

    def added_padding(self, req: PendingRequest) -> int:
        """Tokens of padding `req` (no shorter than any member) adds: every row so far pads up to its length."""
        return self.rows * (req.length - self.longest)

    def add(self, req: PendingRequest) -> None:
        self.members.append(req)
        self.rows += req.rows
        self.longest = max(self.longest, req.length)

    def oldest(self) -> float:
        return min(r.enqueued for r in self.members)


def length_groups(candidates: Sequence[PendingRequest], *, max_rows: int, max_tokens: int = 0,
                  max_padding: float | None = None) -> list[Group]:
    """Cut the candidates, sorted by length, into groups within max_rows, max_tokens and the padding budget
    (None: no budget). A request with more rows than max_rows alone gets a group of its own."""
    groups: list[Group] = []
    group = Group()
    for req in sorted(candidates, key=lambda r: (r.length, r.enqueued)):
        if group.members:
            over_tokens = bool(max_tokens) and (group.rows + req.rows) * req.length > max_tokens
            too_padded = max_padding is not None and group.added_padding(req) > max_padding
            if group.rows + req.rows > max_rows or over_tokens or too_padded:
                group.at_token_bound = over_tokens
                groups.append(group)
                group = Group()
        group.add(req)
    if group.members:
        groups.append(group)
    return groups


def next_group(candidates: Sequence[PendingRequest], *, max_rows: int, max_tokens: int = 0,
               max_padding: float | None = None) -> Group:
    """The group to run next: the oldest candidate's, cut from the oldest part of the queue (members in arrival
    order); an empty Group when there are no candidates. `candidates` come in arrival order (the queue's)."""
    if not candidates:
        return Group()
    # Without a padding budget any lengths stack, so the oldest go together up to the bounds (Triton's FIFO); with
    # one, batch-mates come only from the front of the queue.
    window = candidates if max_padding is None else \
        candidates[:max(MIN_WINDOW, -(-len(candidates) // WINDOW_SHARE))]
    groups = length_groups(window, max_rows=max_rows, max_tokens=max_tokens, max_padding=max_padding)
    oldest = candidates[0]
    best = next(g for g in groups if any(r is oldest for r in g.members))
    # As full as it gets when one more row of its length would break the token bound, whatever waits behind the
    # window: the collector then stops waiting for batch-mates.
    best.at_token_bound |= bool(max_tokens) and (best.rows + 1) * best.longest > max_tokens
    best.members.sort(key=lambda r: r.enqueued)
    return best
