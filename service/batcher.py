"""Dynamic batcher: a bounded admission queue, a batch collector and a batch runner.

The two halves are separately testable, as in Ray Serve and MLServer:
  * `collect_batch` waits for a first request, then up to `max_queue_delay` measured from *its* arrival,
    stopping early at max_batch_size or the largest preferred size; requests whose non-batch dims or
    dtypes differ from the first one's are left queued for a later batch, never stacked;
  * `Batcher._run_batch` drops callers that were cancelled or timed out before spending compute on them,
    runs one concatenated batch, checks the output row count, and resolves or fails every future.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import BackendError, DeadlineExceeded, ModelNotReady, QueueFull, RequestCancelled, ServingError
from service.modelrepo.config import BatchingPolicy

log = logging.getLogger("modelserve.batcher")

Clock = Callable[[], float]
Feeds = dict[str, np.ndarray]
# feeds -> (outputs by name, compute_infer_ns, compute_output_ns); blocking, runs in a worker thread.
RunFn = Callable[[Feeds], tuple[dict[str, np.ndarray], int, int]]


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


def _set_result_if_not_done(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception_if_not_done(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _cancel_if_hung_up(req: PendingRequest) -> bool:
    """True, and the caller answered RequestCancelled, when the caller hung up."""
    if not req.hung_up():
        return False
    _set_exception_if_not_done(req.future, RequestCancelled("client went away while its request was queued"))
    return True


class AdmissionQueue:
    """The bounded FIFO in front of the batcher. max_size 0 means unbounded (Triton's meaning)."""

    def __init__(self, *, max_size: int) -> None:
        self.max_size = max_size
        self._items: deque[PendingRequest] = deque()
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, req: PendingRequest, *, model: str) -> None:
        if self.max_size and len(self._items) >= self.max_size:
            raise QueueFull(f"model {model!r}: queue is full ({self.max_size} requests waiting); retry later")
        self._items.append(req)
        self._arrived.set()

    def discard(self, req: PendingRequest) -> None:
        try:
            self._items.remove(req)
        except ValueError:
            pass

    def first(self) -> PendingRequest:
        return self._items[0]

    def popleft(self) -> PendingRequest:
        return self._items.popleft()

    def remove(self, taken: Sequence[PendingRequest]) -> None:
        chosen = set(map(id, taken))
        self._items = deque(r for r in self._items if id(r) not in chosen)

    def prune(self) -> None:
        """Drop requests nobody waits for; callers who hung up are answered RequestCancelled here."""
        if all(r.wanted() for r in self._items):
            return
        self._items = deque(r for r in self._items if not _cancel_if_hung_up(r) and not r.future.done())

    def drain(self) -> list[PendingRequest]:
        """Empty the queue, returning what was in it."""
        items, self._items = list(self._items), deque()
        return items

    async def wait_not_empty(self) -> None:
        while True:
            self.prune()
            if self._items:
                return
            self._arrived.clear()
            await self._arrived.wait()

    async def wait_for_arrival(self, timeout_s: float) -> None:
        """Until another request arrives or `timeout_s` passes."""
        self._arrived.clear()
        # A timer that sets the event is cheaper than wait_for, which wraps the wait in a new task.
        timer = asyncio.get_running_loop().call_later(timeout_s, self._arrived.set)
        try:
            await self._arrived.wait()
        finally:
            timer.cancel()

    def compatible(self, *, max_rows: int) -> tuple[list[PendingRequest], int]:
        """The queued requests that stack with the first one, in order, up to max_rows."""
        key = self._items[0].shape_key
        taken, rows = [], 0
        for req in self._items:
            if req.shape_key != key or not req.wanted():
                continue
            if rows + req.rows > max_rows:
                break
            taken.append(req)
            rows += req.rows
        return taken, rows


async def collect_batch(
    queue: AdmissionQueue, *, policy: BatchingPolicy | None, max_batch_size: int, clock: Clock
) -> list[PendingRequest]:
    """Wait for requests and form one batch, as Triton's dynamic batcher does."""
    while True:
        await queue.wait_not_empty()
        if policy is None or max_batch_size <= 0:
            return [queue.popleft()]
        batch = await _fill_batch(queue, policy=policy, max_batch_size=max_batch_size, clock=clock)
        if batch:
            return batch


async def _fill_batch(
    queue: AdmissionQueue, *, policy: BatchingPolicy, max_batch_size: int, clock: Clock
) -> list[PendingRequest]:
    """One batch from a non-empty queue, waiting up to the first request's delay; [] if the queue emptied."""
    target = max_batch_size
    if policy.preferred_batch_sizes:
        target = min(max_batch_size, policy.preferred_batch_sizes[-1])
    delay_end = queue.first().enqueued + policy.max_queue_delay_us / 1e6
    # As Triton: a full preferred batch goes at once and is not topped up past the preferred size.
    taken, rows = queue.compatible(max_rows=target)
    while taken and rows < target:
        remaining = delay_end - clock()
        if remaining <= 0:
            break
        await queue.wait_for_arrival(remaining)
        queue.prune()
        if not len(queue):
            return []
        taken, rows = queue.compatible(max_rows=target)
    if rows < target:
        # The delay ran out before a preferred batch formed: send the largest batch there is.
        taken, rows = queue.compatible(max_rows=max_batch_size)
    queue.remove(taken)
    return taken


def _concat(batch: Sequence[PendingRequest]) -> Feeds:
    if len(batch) == 1:
        return batch[0].inputs
    return {name: np.concatenate([r.inputs[name] for r in batch], axis=0) for name in batch[0].inputs}


@dataclass
class BatcherStats:
    """Callbacks the model owner plugs in for statistics and metrics."""

    on_execution: Callable[[int, tuple[int, int, int]], None] = lambda rows, timings: None
    on_queue_change: Callable[[int], None] = lambda depth: None


@dataclass
class Batcher:
    """One model version's queue, collector loop and bounded executions."""

    model: str
    run: RunFn
    executor: Executor
    policy: BatchingPolicy | None
    max_batch_size: int
    concurrency: int
    clock: Clock = time.monotonic
    stats: BatcherStats = field(default_factory=BatcherStats)

    def __post_init__(self) -> None:
        self.queue = AdmissionQueue(max_size=self.policy.max_queue_size if self.policy else 0)
        self._slots = asyncio.Semaphore(self.concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.accepting = True

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._collect_loop(), name=f"batcher:{self.model}")

    def submit(
        self, *, inputs: Feeds, rows: int, timeout_s: float | None, client_gone: Callable[[], bool] | None = None
    ) -> asyncio.Future:
        """Queue a validated request; the future resolves to a BatchResult. Raises QueueFull at once."""
        if not self.accepting:
            raise ModelNotReady(f"model {self.model!r} is unloading; not accepting new requests")
        loop = asyncio.get_running_loop()
        now = self.clock()
        key = tuple((n, a.shape[1:] if self.max_batch_size > 0 else a.shape, a.dtype.str) for n, a in inputs.items())
        req = PendingRequest(inputs=inputs, rows=rows, shape_key=key, future=loop.create_future(), enqueued=now,
                             client_gone=client_gone)
        self.queue.put(req, model=self.model)
        if timeout_s is not None and timeout_s > 0:
            req.deadline = now + timeout_s
            req.timer = loop.call_later(timeout_s, self._expire, req)
        self.stats.on_queue_change(len(self.queue))
        return req.future

    def _expire(self, req: PendingRequest) -> None:
        if req.started is None:
            waited_ms = (self.clock() - req.enqueued) * 1e3
            _set_exception_if_not_done(
                req.future,
                DeadlineExceeded(f"model {self.model!r}: request timed out in the queue after {waited_ms:.1f} ms"),
            )
            self.queue.discard(req)
            self.stats.on_queue_change(len(self.queue))

    async def _collect_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await collect_batch(
                    self.queue, policy=self.policy, max_batch_size=self.max_batch_size, clock=self.clock
                )
            except BaseException:
                self._slots.release()
                raise
            self.stats.on_queue_change(len(self.queue))
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[PendingRequest]) -> None:
        try:
            live = self._live(batch)
            if live:
                await self._execute(live)
        finally:
            self._slots.release()

    @staticmethod
    def _live(batch: list[PendingRequest]) -> list[PendingRequest]:
        """The batch's requests someone still waits for; callers who hung up are answered here."""
        return [r for r in batch if not _cancel_if_hung_up(r) and not r.future.done()]

    async def _execute(self, live: list[PendingRequest]) -> None:
        now = self.clock()
        for r in live:
            r.started = now
            if r.timer is not None:
                r.timer.cancel()
        loop = asyncio.get_running_loop()
        try:
            outputs, timings = await loop.run_in_executor(self.executor, self._run_concat, live)
        except Exception as exc:
            if len(live) > 1 and (not isinstance(exc, ServingError) or exc.status_code < 500):
                # One bad request must not fail its batch-mates (an unexpected error, or an input value the model
                # rejected): rerun each alone to isolate it.
                log.warning("model %r: batch of %d failed (%s); retrying requests one by one", self.model, len(live), exc)
                for r in live:
                    await self._execute([r])
                return
            err = exc if isinstance(exc, ServingError) else BackendError(f"model {self.model!r}: inference failed: {exc}")
            for r in live:
                _set_exception_if_not_done(r.future, err)
            return
        rows = sum(r.rows for r in live)
        self.stats.on_execution(rows, timings)
        offset = 0
        for r in live:
            part = {name: out[offset:offset + r.rows] for name, out in outputs.items()} if len(live) > 1 else outputs
            offset += r.rows
            _set_result_if_not_done(r.future, BatchResult(part, now - r.enqueued, rows, timings))

    def _run_concat(self, live: list[PendingRequest]) -> tuple[dict[str, np.ndarray], tuple[int, int, int]]:
        t0 = time.perf_counter_ns()
        feeds = _concat(live)
        t1 = time.perf_counter_ns()
        outputs, infer_ns, output_ns = self.run(feeds)
        rows = sum(r.rows for r in live)
        if len(live) > 1 or self.max_batch_size > 0:
            for name, out in outputs.items():
                if out.ndim == 0 or out.shape[0] != rows:
                    raise BackendError(
                        f"model {self.model!r}: output {name!r} has {out.shape[0] if out.ndim else 0} rows "
                        f"for a batch of {rows}; the model's first axis must be the batch axis"
                    )
        return outputs, (t1 - t0, infer_ns, output_ns)

    async def close(self, *, grace_s: float) -> None:
        """Stop accepting, let queued and running requests finish (up to grace_s), then stop."""
        self.accepting = False
        end = time.monotonic() + grace_s
        while (len(self.queue) or self._tasks) and time.monotonic() < end:
            self.queue.prune()
            await asyncio.sleep(0.01)
        for r in self.queue.drain():
            _set_exception_if_not_done(r.future, ModelNotReady(f"model {self.model!r} was unloaded"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
