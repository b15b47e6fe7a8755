"""The batcher's queue: pending requests, the bounded admission FIFO, and which requests stack together."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import QueueFull, RequestCancelled
from service.length_groups import next_group

Feeds = dict[str, np.ndarray]

@dataclass(eq=False)
class PendingRequest:
    """One caller's request waiting in (or taken from) the queue."""

    inputs: Feeds
    rows: int
    shape_key: tuple
    future: asyncio.Future
    enqueued: float
    deadline: float | None = None
    timer: asyncio.TimerHandle | None = None
    started: float | None = None
    client_gone: Callable[[], bool] | None = None
    length: int = 0  # the ragged axis's length, for length-aware models; 0 otherwise
    priority: int = 0  # the priority level (1 first); 0 for every request of a model without levels

    def hung_up(self) -> bool:
        return self.client_gone is not None and self.client_gone()

    def wanted(self) -> bool:
        """Whether anyone still waits for this answer (not cancelled, timed out, or hung up)."""
        return not self.future.done() and not self.hung_up()


@dataclass
class BatchResult:
    """What the runner hands back to each caller's future."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    batch_rows: int
    timings_ns: tuple[int, int, int] = (0, 0, 0)


def set_result_if_not_done(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def set_exception_if_not_done(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def cancel_if_hung_up(req: PendingRequest) -> bool:
    """True, and the caller answered RequestCancelled, when the caller hung up."""
    if not req.hung_up():
        return False
    set_exception_if_not_done(req.future, RequestCancelled("client went away while its request was queued"))
    return True


class AdmissionQueue:
    """The bounded FIFO in front of the batcher. max_size 0 means unbounded (Triton's meaning)."""

    def __init__(self, *, max_size: int, on_change: Callable[[int], None] = lambda depth: None) -> None:
        self.max_size = max_size
        # Told the depth after every change, whatever made it (an arrival, a dispatch, a cancelled caller): the
        # pending-request gauge reads it, so a request that left the queue never counts as waiting.
        self._on_change = on_change
        self._items: deque[PendingRequest] = deque()
        self._arrived = asyncio.Event()
        self.token_bound_hit = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, req: PendingRequest, *, model: str) -> None:
        if self.max_size and len(self._items) >= self.max_size:
            # NOTE: Triton's words first (its QA tests look for them), then ours.
            raise QueueFull(f"Exceeds maximum queue size: model {model!r}: queue is full ({self.max_size} requests "
                            "waiting); retry later")
        if not self._items or self._items[-1].priority <= req.priority:
            self._items.append(req)
        else:
            # Triton's priority levels: behind every request of its level or a more urgent one, ahead of the rest
            # (FIFO within a level). Only a model with levels gets here, and walks past the less urgent only.
            at = len(self._items)
            while at > 0 and self._items[at - 1].priority > req.priority:
                at -= 1
            self._items.insert(at, req)
        self._arrived.set()
        self._on_change(len(self._items))

    def discard(self, req: PendingRequest) -> None:
        try:
            self._items.remove(req)
        except ValueError:
            return
        self._on_change(len(self._items))

    def first(self) -> PendingRequest:
        return self._items[0]

    def popleft(self) -> PendingRequest:
        req = self._items.popleft()
        self._on_change(len(self._items))
        return req

    def remove(self, taken: Sequence[PendingRequest]) -> None:
        """Take a dispatched batch out."""
        chosen = set(map(id, taken))
        self._items = deque(r for r in self._items if id(r) not in chosen)
        self._on_change(len(self._items))

    def prune(self) -> None:
        """Drop requests nobody waits for; callers who hung up are answered RequestCancelled here."""
        if all(r.wanted() for r in self._items):
            return
        self._items = deque(r for r in self._items if not cancel_if_hung_up(r) and not r.future.done())
        self._on_change(len(self._items))

    def drain(self) -> list[PendingRequest]:
        """Empty the queue, returning what was in it."""
        items, self._items = list(self._items), deque()
        self._on_change(0)
        return items

    async def wait_not_empty(self) -> None:
        while True:
            self.prune()
            if self._items:
                return
            self._arrived.clear()
            await self._arrived.wait()

    def wake(self) -> None:
        """Wake a collector waiting for an arrival (something it waits on changed without one)."""
        self._arrived.set()

    async def wait_for_arrival(self, timeout_s: float) -> None:
        """Until another request arrives or `timeout_s` passes."""
        self._arrived.clear()
        # A timer that sets the event is cheaper than wait_for, which wraps the wait in a new task.
        timer = asyncio.get_running_loop().call_later(timeout_s, self._arrived.set)
        try:
            await self._arrived.wait()
        finally:
            timer.cancel()

    def compatible(self, *, max_rows: int, by_length: bool = False, max_tokens: int = 0,
                   max_padding: float | None = None) -> tuple[list[PendingRequest], int]:
        """The queued requests that stack with the first one, in order, up to max_rows.

        by_length: requests of other lengths stack too, padded: the oldest request of the first one's shape goes
        with the near lengths among the oldest waiting (service/length_groups.py). max_tokens (> 0): rows times the padded length stays within it (a model's
        memory grows with both). max_padding: a request joins only if the padding it adds (in tokens) costs less
        than the run it saves (the planner's b / a).
        """
        key = self._items[0].shape_key
        # read by the collector: a batch at its token bound is as full as it gets
        self.token_bound_hit = False
        if by_length:
            group = next_group([r for r in self._items if r.shape_key == key and r.wanted()], max_rows=max_rows,
                               max_tokens=max_tokens, max_padding=max_padding)
            self.token_bound_hit = group.at_token_bound
            return group.members, group.rows
        taken: list[PendingRequest] = []
        rows = 0
        for req in self._items:
            if req.shape_key != key or not req.wanted():
                continue
            if rows + req.rows > max_rows:
                break
            taken.append(req)
            rows += req.rows
        return taken, rows
