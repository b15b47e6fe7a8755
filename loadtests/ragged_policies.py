"""Alternative length-aware batch choosers for loadtests/ragged_sim.py: what else service/length_groups.py could do.

Each chooser takes what `length_groups.next_group` takes (the waiting requests of one shape in arrival order, and
the row, token and padding bounds) and returns the Group to run next. They reuse `length_groups.length_groups`
(the sorted-length cut) so only the choice between groups differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from service import length_groups as lg
from service.batch_queue import PendingRequest

Chooser = Callable[..., lg.Group]


def _ordered(group: lg.Group) -> lg.Group:
    group.members.sort(key=lambda r: r.enqueued)
    return group


def _holding(groups: list[lg.Group], req: PendingRequest) -> lg.Group:
    return next(g for g in groups if any(m is req for m in g.members))


class PassCount:
    """Batches that took a younger request while each request waited (rounds 3-4 bounded these; the served rule
    needs no count). The simulator reports every dispatch here."""

    def __init__(self) -> None:
        self._passed: dict[int, int] = {}

    def reset(self) -> None:
        self._passed.clear()

    def of(self, req: PendingRequest) -> int:
        return self._passed.get(id(req), 0)

    def dispatched(self, taken: Sequence[PendingRequest], left: Sequence[PendingRequest]) -> None:
        for r in taken:
            self._passed.pop(id(r), None)
        youngest = max(r.enqueued for r in taken)
        for r in left:
            if r.enqueued < youngest:
                self._passed[id(r)] = self.of(r) + 1


PASSES = PassCount()


def window(share: int, min_window: int, max_passes: int = 2) -> Chooser:
    """Round 3 (share 1: the whole queue) and round 4 (share 3, min 8): the best-filled group of the oldest 1/share;
    while a request was passed over `max_passes` times, only such overdue requests are grouped, oldest first."""
    def choose(candidates: Sequence[PendingRequest], **bounds) -> lg.Group:
        overdue = [r for r in candidates if PASSES.of(r) >= max_passes]
        pool = overdue or candidates
        groups = lg.length_groups(pool[:max(min_window, -(-len(pool) // share))], **bounds)
        if not groups:
            return lg.Group()
        if overdue:  # as round 4 chose it: the first group whose oldest member arrived when the oldest overdue did
            oldest = min(r.enqueued for r in overdue)
            return _ordered(next(g for g in groups if g.oldest() == oldest))
        return _ordered(max(groups, key=lambda g: (g.rows, -g.oldest())))
    return choose


def anchor(candidates: Sequence[PendingRequest], **bounds) -> lg.Group:
    """The group (cut from the whole queue) that holds the oldest request: FIFO head, riders of any age."""
    if not candidates:
        return lg.Group()
    return _ordered(_holding(lg.length_groups(candidates, **bounds), candidates[0]))


def anchor_best(oldest: int) -> Chooser:
    """The best-filled group (cut from the whole queue) among those holding one of the `oldest` oldest requests."""
    def choose(candidates: Sequence[PendingRequest], **bounds) -> lg.Group:
        groups = lg.length_groups(candidates, **bounds)
        if not groups:
            return lg.Group()
        head = {id(r) for r in candidates[:oldest]}
        eligible = [g for g in groups if any(id(m) in head for m in g.members)]
        return _ordered(max(eligible, key=lambda g: (g.rows, -g.oldest())))
    return choose


def anchor_window(share: int, min_window: int) -> Chooser:
    """The group holding the oldest request, cut from the oldest 1/share of the queue (at least min_window)."""
    def choose(candidates: Sequence[PendingRequest], **bounds) -> lg.Group:
        pool = candidates[:max(min_window, -(-len(candidates) // share))]
        return anchor(pool, **bounds)
    return choose


def grow_window(share: int, min_window: int) -> Chooser:
    """The oldest request plus, from the oldest 1/share of the queue, the rider adding least padding, again and
    again while each adds no more than the budget (and the row and token bounds hold)."""
    def choose(candidates: Sequence[PendingRequest], *, max_rows: int, max_tokens: int = 0,
               max_padding: float | None = None) -> lg.Group:
        pool = list(candidates[:max(min_window, -(-len(candidates) // share))])
        group = lg.Group()
        budget = 0.0 if max_padding is None else max_padding
        while pool:
            def added(r: PendingRequest) -> int:
                longest = max(group.longest, r.length)
                return group.rows * (longest - group.longest) + r.rows * (longest - r.length)
            req = pool[0] if not group.members else min(pool, key=lambda r: (added(r), r.enqueued))
            rows, longest = group.rows + req.rows, max(group.longest, req.length)
            if group.members and (added(req) > budget or rows > max_rows
                                  or (max_tokens and rows * longest > max_tokens)):
                break
            group.add(req)
            pool.remove(req)
        return _ordered(group)
    return choose


def age_cap(share: int, min_window: int, max_passes: int) -> Chooser:
    """Best-filled group of the oldest 1/share (at least min_window); once the oldest request was passed over
    `max_passes` times, the window's group holding it goes instead (riders of any age within the window)."""
    def choose(candidates: Sequence[PendingRequest], **bounds) -> lg.Group:
        pool = candidates[:max(min_window, -(-len(candidates) // share))]
        groups = lg.length_groups(pool, **bounds)
        if not groups:
            return lg.Group()
        if PASSES.of(pool[0]) >= max_passes:
            return _ordered(_holding(groups, pool[0]))
        return _ordered(max(groups, key=lambda g: (g.rows, -g.oldest())))
    return choose


def anchor_fill(share: int, min_window: int, exact: int = 0) -> Chooser:
    """anchor_window, then riders from the rest of the queue (arrival order) that do not lengthen the batch and
    pad themselves by at most the budget (exact=1: only lengths already in the batch), as plain batching lets
    equal lengths ride from anywhere."""
    def choose(candidates: Sequence[PendingRequest], *, max_rows: int, max_tokens: int = 0,
               max_padding: float | None = None) -> lg.Group:
        size = max(min_window, -(-len(candidates) // share))
        group = anchor(candidates[:size], max_rows=max_rows, max_tokens=max_tokens, max_padding=max_padding)
        budget = 0.0 if max_padding is None else max_padding
        lengths = {m.length for m in group.members}
        for req in candidates[size:]:
            fits = req.length in lengths if exact else (req.length <= group.longest
                                                       and group.longest - req.length <= budget)
            if (fits and group.rows + req.rows <= max_rows
                    and not (max_tokens and (group.rows + req.rows) * group.longest > max_tokens)):
                group.add(req)
        return _ordered(group)
    return choose


def overdue_riders(max_passes: int) -> Chooser:
    """Whole queue, best-filled; once a request was passed over `max_passes` times, the group (cut from the whole
    queue, riders of any age) holding the oldest overdue request goes."""
    def choose(candidates: Sequence[PendingRequest], **bounds) -> lg.Group:
        groups = lg.length_groups(candidates, **bounds)
        if not groups:
            return lg.Group()
        overdue = [r for r in candidates if PASSES.of(r) >= max_passes]
        if overdue:
            return _ordered(_holding(groups, overdue[0]))
        return _ordered(max(groups, key=lambda g: (g.rows, -g.oldest())))
    return choose


def fifo(*, skip: bool) -> Chooser:
    """First come, first served under a budget, as TGI's and vLLM's (fcfs) queues take requests: the head, then later
    requests in arrival order while the padding each adds (it pads the others up, or is padded up itself) stays
    within the budget and the row and token bounds; at the first that does not fit, stop (skip: pass over it)."""
    def choose(candidates: Sequence[PendingRequest], *, max_rows: int, max_tokens: int = 0,
               max_padding: float | None = None) -> lg.Group:
        group = lg.Group()
        budget = 0.0 if max_padding is None else max_padding
        for req in candidates:
            if group.members:
                longest = max(group.longest, req.length)
                added = group.rows * (longest - group.longest) + req.rows * (longest - req.length)
                if (group.rows + req.rows > max_rows or added > budget
                        or (max_tokens and (group.rows + req.rows) * longest > max_tokens)):
                    if skip:
                        continue
                    break
            group.add(req)
        return group
    return choose


def parse(name: str) -> Chooser | None:
    """"window:SHARE:MIN", "anchor-window:SHARE:MIN", "grow:SHARE:MIN", "cap:SHARE:MIN:PASSES"; None for other names."""
    kind, _, rest = name.partition(":")
    makers: dict[str, Callable[..., Chooser]] = {"window": window, "anchor-window": anchor_window,
                                                  "grow": grow_window, "cap": age_cap,
                                                  "anchor-fill": anchor_fill}
    if kind not in makers or not rest:
        return None
    return makers[kind](*(int(x) for x in rest.split(":")))


POLICIES: dict[str, Chooser] = {
    "whole": window(1, 0),  # round 3
    "window": window(3, 8),  # round 4
    "anchor": anchor,
    "anchor-best 8": anchor_best(8),
    "overdue-riders 1": overdue_riders(1),
    "overdue-riders 2": overdue_riders(2),
    "fifo-budget": fifo(skip=True),
    "fifo-prefix": fifo(skip=False),
}
