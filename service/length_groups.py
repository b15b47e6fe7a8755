"""Length-aware batching: which waiting requests of different lengths run together, and which group goes next.

The waiting requests are sorted by length and cut into groups: a request joins the group of the shorter ones
before it when the padding it adds (the group's rows, padded up to its length) stays within the budget (the
planner's `b / a`: the tokens one run's fixed cost pays for), within max_rows and the token bound; otherwise it
starts a new group. Of those groups the best-filled one goes (most rows; ties: the one holding the oldest
request), so with a deep queue a lone request does not take the run while several of one length wait.

Reordering is bounded twice. A batch is drawn only from the oldest part of the queue (WINDOW_SHARE of it, at
least MIN_WINDOW requests), so no request runs ahead of more older ones than that: drawn from the whole queue, the
young requests that rode along with every well-filled batch pushed the ones they passed into the tail (p99 777
vs 686 ms for equal-length batching in a quiet round; docs/BENCHMARKS.md "Length-aware text, round 4").
And a request passed over MAX_PASSES times (batches that took a younger request while it waited) is
overdue; while any is, only overdue requests are grouped, and the group holding the oldest of them goes. Nothing
younger goes ahead of an overdue request, and overdue requests still share runs with each other.

Hand-written: the grouping is a linear pass over a sorted list; no library offers a batching policy to take it from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # batch_queue imports this module; the type is only needed for annotations
    from service.batch_queue import PendingRequest

# How many batches may take a younger request past one that waits (a different length) before younger requests
# stop going ahead of it. Without a bound a request of an odd length could wait for every other length.
MAX_PASSES = 2
# A batch is drawn from the oldest 1/WINDOW_SHARE of the waiting requests, and from at least MIN_WINDOW of them:
# a third kept the mean p99 of a closed loop of 32 at or below equal-length batching's at every fixed run cost
# simulated (loadtests/ragged_sim.py: 1-12 ms), for 1-9 % fewer rows/s than drawing from the whole queue; a half
# left p99 above it, a quarter cost 1-3 % more rows/s than a third.
WINDOW_SHARE = 3
MIN_WINDOW = 8


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
    """The group to run next (members in arrival order); an empty Group when there are no candidates.
    `candidates` come in arrival order (the queue's)."""
    overdue = [r for r in candidates if r.passed >= MAX_PASSES]
    pool = overdue or candidates
    pool = pool[:max(MIN_WINDOW, -(-len(pool) // WINDOW_SHARE))]
    groups = length_groups(pool, max_rows=max_rows, max_tokens=max_tokens, max_padding=max_padding)
    if not groups:
        return Group()
    if overdue:
        oldest = min(r.enqueued for r in overdue)
        best = next(g for g in groups if g.oldest() == oldest)
    else:
        best = max(groups, key=lambda g: (g.rows, -g.oldest()))
    best.members.sort(key=lambda r: r.enqueued)
    return best
