"""Dynamic batcher: a bounded admission queue, a batch collector and a batch runner.

The two halves are separately testable, as in Ray Serve and MLServer:
  * `Collector.collect` waits for a first request, then up to `max_queue_delay` measured from *its* arrival,
    stopping early at max_batch_size or the largest preferred size; requests whose non-batch dims or
    dtypes differ from the first one's are left queued for a later batch, never stacked;
  * `Batcher._dispatch` drops callers that were cancelled or timed out before spending compute on them and
    hands one concatenated batch to the executor; `Batcher._execute` checks the output row count and
    resolves or fails every future.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.batch_planner import DispatchReason, Planner
from service.batch_queue import (
    AdmissionQueue,
    BatchResult,
    Feeds,
    PendingRequest,
    cancel_if_hung_up,
    set_exception_if_not_done,
    set_result_if_not_done,
)
from service.errors import BackendError, DeadlineExceeded, ModelNotReady, ServingError
from service.modelrepo.config import BatchingPolicy
from service.ragged import RaggedPolicy

log = logging.getLogger("modelserve.batcher")

Clock = Callable[[], float]
# feeds -> (outputs by name, compute_infer_ns, compute_output_ns); blocking, runs in a worker thread.
RunFn = Callable[[Feeds], tuple[dict[str, np.ndarray], int, int]]


@dataclass
class Collector:
    """How one batcher forms batches: Triton's policy, and optionally the adaptive planner and length grouping."""

    policy: BatchingPolicy | None
    max_batch_size: int
    clock: Clock
    planner: Planner | None = None  # None: Triton's fixed max_queue_delay
    in_flight: Callable[[], int] = lambda: 0  # requests running now
    arriving: Callable[[], int] = lambda: 0  # requests routed to this model whose bodies are still being read
    by_length: bool = False
    max_tokens: int = 0  # with by_length: rows x padded length per batch, at most (0: no bound)

    async def collect(self, queue: AdmissionQueue) -> tuple[list[PendingRequest], DispatchReason]:
        """Wait for requests and form one batch, as Triton's dynamic batcher does."""
        while True:
            await queue.wait_not_empty()
            if self.policy is None or self.max_batch_size <= 0:
                return [queue.popleft()], DispatchReason.UNBATCHED
            batch, reason = await self._fill(queue, self.policy)
            if batch:
                return batch, reason

    def _compatible(self, queue: AdmissionQueue, max_rows: int) -> tuple[list[PendingRequest], int]:
        padding = self.planner.max_padding() if self.planner is not None and self.by_length else None
        return queue.compatible(max_rows=max_rows, by_length=self.by_length, max_tokens=self.max_tokens,
                                max_padding=padding)

    def _wait_s(self, queue: AdmissionQueue, *, taken: list[PendingRequest], rows: int, delay_end: float) -> float:
        now = self.clock()
        remaining = delay_end - now
        if self.planner is None or remaining <= 0:
            return remaining
        if self.arriving() > 0:
            # More requests are in flight than are queued or running: they are certain batch-mates, not guessed
            # ones, so wait for them (an arrival, or an arrival that failed, wakes the wait).
            return remaining
        others = len(queue) - len(taken) + self.in_flight()
        waited = now - queue.first().enqueued
        return self.planner.plan(rows=rows, others_in_flight=others, now=now, waited=waited, remaining=remaining)

    async def _fill(self, queue: AdmissionQueue, policy: BatchingPolicy) -> tuple[list[PendingRequest], DispatchReason]:
        """One batch from a non-empty queue, waiting up to the first request's delay; [] if the queue emptied."""
        target = self.max_batch_size
        if policy.preferred_batch_sizes:
            target = min(self.max_batch_size, policy.preferred_batch_sizes[-1])
        delay_end = queue.first().enqueued + policy.max_queue_delay_us / 1e6
        # As Triton: a full preferred batch goes at once and is not topped up past the preferred size.
        taken, rows = self._compatible(queue, target)
        reason = DispatchReason.FULL if target == self.max_batch_size else DispatchReason.PREFERRED
        while taken and rows < target and not queue.token_bound_hit:
            wait = self._wait_s(queue, taken=taken, rows=rows, delay_end=delay_end)
            if wait <= 0:
                reason = DispatchReason.DELAY if self.clock() >= delay_end else DispatchReason.ADAPTIVE
                break
            await queue.wait_for_arrival(wait)
            queue.prune()
            if not len(queue):
                return [], reason
            taken, rows = self._compatible(queue, target)
        if rows < target and not queue.token_bound_hit:
            # The wait ended before a preferred batch formed: send the largest batch there is.
            taken, rows = self._compatible(queue, self.max_batch_size)
            if rows >= self.max_batch_size:
                reason = DispatchReason.FULL
        queue.remove(taken)
        return taken, reason


def _concat(batch: Sequence[PendingRequest], ragged: RaggedPolicy | None) -> Feeds:
    if len(batch) == 1:
        return batch[0].inputs
    if ragged is not None:
        return ragged.concat([r.inputs for r in batch])
    return {name: np.concatenate([r.inputs[name] for r in batch], axis=0) for name in batch[0].inputs}


@dataclass
class BatcherStats:
    """Callbacks the model owner plugs in for statistics and metrics."""

    on_execution: Callable[[int, tuple[int, int, int]], None] = lambda rows, timings: None
    on_queue_change: Callable[[int], None] = lambda depth: None
    on_dispatch: Callable[[DispatchReason, int], None] = lambda reason, rows: None


@dataclass
class Batcher:
    """One model version's queue, collector loop and bounded executions.

    adaptive: decide each wait with a `Planner` (Triton's max_queue_delay stays the upper bound) and shed
    requests whose queue timeout the predicted batch cost would miss. ragged: pad requests of different lengths
    into one batch, grouping similar lengths.
    """

    model: str
    run: RunFn
    executor: Executor
    policy: BatchingPolicy | None
    max_batch_size: int
    concurrency: int
    clock: Clock = time.monotonic
    stats: BatcherStats = field(default_factory=BatcherStats)
    adaptive: bool = False
    ragged: RaggedPolicy | None = None

    def __post_init__(self) -> None:
        self.queue = AdmissionQueue(max_size=self.policy.max_queue_size if self.policy else 0,
                                    on_change=lambda depth: self.stats.on_queue_change(depth))
        self._slots = asyncio.Semaphore(self.concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.accepting = True
        self.planner = Planner()
        self._running = 0
        self._arriving = 0
        self._loop_cpu_clock: int | None = None
        # NOTE: the loop, kept: asyncio.get_running_loop() makes a getpid() system call each time (CPython 3.11
        # checks for a fork), and py-spy put that call at ~1 % of the event loop at concurrency 32.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.collector = Collector(policy=self.policy, max_batch_size=self.max_batch_size, clock=self.clock,
                                   planner=self.planner if self.adaptive else None,
                                   in_flight=lambda: self._running, arriving=lambda: self._arriving,
                                   by_length=self.ragged is not None,
                                   max_tokens=self.ragged.max_tokens if self.ragged is not None else 0)

    def start(self) -> None:
        # The event loop thread's CPU clock: a run's own CPU is the process's less what the loop spent meanwhile.
        self._loop_cpu_clock = time.pthread_getcpuclockid(threading.get_ident())
        self._loop = asyncio.get_running_loop()
        self._loop_task = self._loop.create_task(self._collect_loop(), name=f"batcher:{self.model}")

    @property
    def arriving(self) -> int:
        return self._arriving

    def announce(self) -> None:
        """A transport has a request for this model whose body is still arriving; `withdraw` when it is decoded
        (and about to be submitted) or failed."""
        self._arriving += 1

    def withdraw(self) -> None:
        self._arriving -= 1
        self.queue.wake()

    def _shape_key(self, inputs: Feeds) -> tuple:
        if self.ragged is not None:
            return self.ragged.shape_key(inputs)
        return tuple((n, a.shape[1:] if self.max_batch_size > 0 else a.shape, a.dtype.str) for n, a in inputs.items())

    def submit(
        self, *, inputs: Feeds, rows: int, timeout_s: float | None, client_gone: Callable[[], bool] | None = None,
        priority: int = 0,
    ) -> asyncio.Future:
        """Queue a validated request; the future resolves to a BatchResult. Raises QueueFull at once. `priority`:
        its level (1 first; 0 when the model has no levels): it waits behind every request of a level before."""
        if not self.accepting:
            raise ModelNotReady(f"model {self.model!r} is unloading; not accepting new requests")
        loop = self._loop or asyncio.get_running_loop()
        now = self.clock()
        req = PendingRequest(inputs=inputs, rows=rows, shape_key=self._shape_key(inputs), future=loop.create_future(),
                             enqueued=now, client_gone=client_gone,
                             length=self.ragged.length(inputs) if self.ragged is not None else 0, priority=priority)
        self.queue.put(req, model=self.model)
        if self.adaptive:  # only the adaptive planner reads what it learns (below too)
            self.planner.observe_arrival(now, others=len(self.queue) - 1 + self._running)
        if timeout_s is not None and timeout_s > 0:
            req.deadline = now + timeout_s
            req.timer = loop.call_later(timeout_s, self._expire, req)
        req.future.add_done_callback(functools.partial(self._withdrawn, req))
        return req.future

    def _withdrawn(self, req: PendingRequest, future: asyncio.Future) -> None:
        """A caller cancelled its wait (a gRPC client's cancel, a stream closed with its requests cancelled)
        while its request was still queued: take it out now, not when the next batch forms, so it stops
        counting as pending (a queue with a long max_queue_delay, or behind a busy instance, may form none for
        a long time), and let the collector re-plan without it."""
        if future.cancelled() and req.started is None:
            if req.timer is not None:
                req.timer.cancel()
            self.queue.discard(req)
            self.queue.wake()

    def _expire(self, req: PendingRequest) -> None:
        if req.started is None:
            waited_ms = (self.clock() - req.enqueued) * 1e3
            set_exception_if_not_done(
                req.future,
                DeadlineExceeded(f"{DeadlineExceeded.TRITON_TEXT}: model {self.model!r}: request timed out in the "
                                 f"queue after {waited_ms:.1f} ms (its queue policy's timeout)"),
            )
            self.queue.discard(req)

    async def _collect_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch, reason = await self.collector.collect(self.queue)
            except BaseException:
                self._slots.release()
                raise
            self.stats.on_dispatch(reason, sum(r.rows for r in batch))
            self._dispatch(batch)

    def _dispatch(self, batch: list[PendingRequest]) -> None:
        """Hand a batch to the executor now, from the collector's own step, and answer it in a task.

        NOTE: the slot (an instance) is freed as soon as the run returns, before the batch's answers are handed
        back. The collector's wake-up is then queued ahead of the callers' wake-ups, so the next batch starts
        computing while the event loop encodes and writes the previous batch's answers; before, the instance
        sat idle through them (~20 us of loop work per answer at concurrency 32).
        """
        self._running += len(batch)
        held = True

        def free() -> None:
            nonlocal held
            if held:
                held = False
                self._running -= len(batch)
                self._slots.release()

        try:
            live = self._shed_late(self._live(batch))
            started = self._start(live) if live else None
        except Exception as exc:  # e.g. an executor already shut down: this batch fails, the collector goes on
            free()
            err = exc if isinstance(exc, ServingError) else BackendError(f"model {self.model!r}: inference failed: {exc}")
            for r in batch:
                set_exception_if_not_done(r.future, err)
            return
        except BaseException:
            free()
            raise
        if started is None:
            free()
            return
        task = (self._loop or asyncio.get_running_loop()).create_task(self._execute(live, started=started, on_ran=free))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: free())  # also when the task ends early (cancelled, an error)

    @staticmethod
    def _live(batch: list[PendingRequest]) -> list[PendingRequest]:
        """The batch's requests someone still waits for; callers who hung up are answered here."""
        return [r for r in batch if not cancel_if_hung_up(r) and not r.future.done()]

    def _shed_late(self, live: list[PendingRequest]) -> list[PendingRequest]:
        """Adaptive only: answer 503 now, not late, to requests the predicted batch cost would finish too late for."""
        if not self.adaptive or all(r.deadline is None for r in live):
            return live
        now, rows = self.clock(), sum(r.rows for r in live)
        kept = []
        for r in live:
            if self.planner.can_meet(deadline=r.deadline, units=self._units(live), now=now):
                kept.append(r)
                continue
            predicted = self.planner.cost.predict(self._units(live)) or 0.0
            left_ms = ((r.deadline or now) - now) * 1e3
            set_exception_if_not_done(r.future, DeadlineExceeded(
                f"{DeadlineExceeded.TRITON_TEXT}: model {self.model!r}: shed before running: a batch of {rows} "
                f"rows is predicted to take "
                f"{predicted * 1e3:.1f} ms and the request's queue timeout leaves {left_ms:.1f} ms"))
        return kept

    def _units(self, live: list[PendingRequest]) -> int:
        """What a batch's cost follows: rows, or for a length-aware model rows x padded length."""
        rows = sum(r.rows for r in live)
        return rows * max(r.length for r in live) if self.ragged is not None else rows

    def _start(self, live: list[PendingRequest]) -> tuple[float, asyncio.Future]:
        """Mark the requests started and submit their run to the executor: (when, the run's future)."""
        now = self.clock()
        for r in live:
            r.started = now
            if r.timer is not None:
                r.timer.cancel()
        return now, (self._loop or asyncio.get_running_loop()).run_in_executor(self.executor, self._run_concat, live)

    async def _execute(self, live: list[PendingRequest], *, started: tuple[float, asyncio.Future] | None = None,
                       on_ran: Callable[[], None] = lambda: None) -> None:
        """Run `live` (or await its run, already `started`) and answer every caller; `on_ran` is called once
        the run succeeded, before the answers."""
        now, run = started if started is not None else self._start(live)
        try:
            outputs, timings, run_cpu = await run
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
                set_exception_if_not_done(r.future, err)
            return
        on_ran()
        rows = sum(r.rows for r in live)
        if self.adaptive:
            # NOTE: not for Triton's fixed delay: time.process_time() sums every thread's CPU in the kernel, and
            # py-spy put it at ~2 % of the event loop at concurrency 32 for a planner nothing then reads.
            self.planner.observe_batch(units=self._units(live), wall_s=self.clock() - now,
                                       cpu_now=time.process_time(), wall_now=time.monotonic())
            if self.ragged is not None:
                self.planner.run_cpu.observe(self._units(live), run_cpu)
        self.stats.on_execution(rows, timings)
        self._answer(live, outputs, rows=rows, queued_at=now, timings=timings)

    def _answer(self, live: list[PendingRequest], outputs: dict[str, np.ndarray], *, rows: int, queued_at: float,
                timings: tuple[int, int, int]) -> None:
        offset = 0
        for r in live:
            part = {name: out[offset:offset + r.rows] for name, out in outputs.items()} if len(live) > 1 else outputs
            if self.ragged is not None and len(live) > 1:
                part = self.ragged.cut(part, length=r.length)
            offset += r.rows
            set_result_if_not_done(r.future, BatchResult(part, queued_at - r.enqueued, rows, timings))

    def _run_concat(self, live: list[PendingRequest]) -> tuple[dict[str, np.ndarray], tuple[int, int, int], float]:
        """Runs in a worker thread: the batch's outputs, its timings, and the CPU of the run itself (the process's
        less the event loop thread's meanwhile: ONNX Runtime's threads, about)."""
        t0 = time.perf_counter_ns()
        feeds = _concat(live, self.ragged)
        t1 = time.perf_counter_ns()
        measure = self.ragged is not None and self.adaptive  # only the adaptive planner's padding budget uses it
        cpu0, loop0 = self._cpu_now() if measure else (0.0, 0.0)
        outputs, infer_ns, output_ns = self.run(feeds)
        cpu1, loop1 = self._cpu_now() if measure else (0.0, 0.0)
        run_cpu = (cpu1 - cpu0) - (loop1 - loop0)
        rows = sum(r.rows for r in live)
        if len(live) > 1 or self.max_batch_size > 0:
            for name, out in outputs.items():
                if out.ndim == 0 or out.shape[0] != rows:
                    raise BackendError(
                        f"model {self.model!r}: output {name!r} has {out.shape[0] if out.ndim else 0} rows "
                        f"for a batch of {rows}; the model's first axis must be the batch axis"
                    )
        return outputs, (t1 - t0, infer_ns, output_ns), run_cpu

    def _cpu_now(self) -> tuple[float, float]:
        """(process CPU, event-loop thread CPU) now."""
        if self._loop_cpu_clock is None:
            return 0.0, 0.0
        return time.process_time(), time.clock_gettime(self._loop_cpu_clock)

    async def close(self, *, grace_s: float) -> None:
        """Stop accepting, let queued and running requests finish (up to grace_s), then stop."""
        self.accepting = False
        end = time.monotonic() + grace_s
        while (len(self.queue) or self._tasks) and time.monotonic() < end:
            self.queue.prune()
            await asyncio.sleep(0.01)
        for r in self.queue.drain():
            set_exception_if_not_done(r.future, ModelNotReady(f"model {self.model!r} was unloaded"))
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
