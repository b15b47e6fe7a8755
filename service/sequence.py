"""Sequence batcher for stateful models (Triton's `sequence_batching`), beside the dynamic Batcher.

Each sequence (a correlation id from the request's `sequence_id` parameter) holds a slot from its START
request until its END request or until it has been idle for max_sequence_idle_microseconds. Its requests run
one at a time and in arrival order; requests of different sequences are batched together:
  * `direct`: a sequence's slot is its row in the batch; rows of slots with nothing to run get READY=0 and
    zero inputs, so the model sees every live sequence in a fixed position;
  * `oldest`: the oldest waiting request of each sequence, packed, up to max_batch_size rows.
The server feeds the control inputs (START, END, READY, CORRID) and carries implicit state between a
sequence's steps: zeros (or initial_state) on START, the graph's state output after each step, dropped on END
or when the sequence goes idle. Sequences beyond the slot count wait (backlog) until a slot frees.

NOTE: one batch runs at a time per model version. That keeps a sequence's steps ordered with no cross-batch
bookkeeping; several instances of a sequence model therefore do not run in parallel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.batcher import BatcherStats, BatchResult
from service.errors import BackendError, InvalidInput, ModelNotReady, RequestCancelled, ServingError
from service.sequence_config import SequenceId, SequencePolicy, corrid_value

log = logging.getLogger("modelserve.sequence")

Feeds = dict[str, np.ndarray]
# (feeds, output names) -> (outputs by name, compute_infer_ns, compute_output_ns); blocking.
NamedRunFn = Callable[[Feeds, list[str]], tuple[dict[str, np.ndarray], int, int]]


@dataclass(eq=False)
class Step:
    """One request of a sequence."""

    inputs: Feeds
    start: bool
    end: bool
    future: asyncio.Future
    enqueued: float
    client_gone: Callable[[], bool] | None = None


@dataclass(eq=False)
class Sequence:
    id: SequenceId
    steps: deque[Step] = field(default_factory=deque)
    slot: int | None = None
    state: dict[str, np.ndarray] = field(default_factory=dict)
    closing: bool = False  # END queued (or superseded by a new START): no more steps may join
    idle_timer: asyncio.TimerHandle | None = None


def sequence_flags(parameters: dict, *, model: str) -> tuple[SequenceId, bool, bool]:
    """(sequence id, start, end) from request parameters, with Triton's message when the id is missing."""
    sid = parameters.get("sequence_id", 0)
    if isinstance(sid, bool) or not isinstance(sid, int | str):
        raise InvalidInput(f"parameter 'sequence_id': expected an integer or a string, got {sid!r}")
    if sid == 0 or sid == "":
        raise InvalidInput(f"inference request to model '{model}' must specify a non-zero or non-empty "
                           "correlation ID; send parameters sequence_id (and sequence_start on the first request)")
    flags = []
    for key in ("sequence_start", "sequence_end"):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            raise InvalidInput(f"parameter {key!r}: expected true or false, got {value!r}")
        flags.append(value)
    return sid, flags[0], flags[1]


class SequenceBatcher:
    """One sequence model version's sequences, slots and batch loop."""

    def __init__(self, *, model: str, run: NamedRunFn, executor: Executor, policy: SequencePolicy,
                 max_batch_size: int, output_names: list[str], stats: BatcherStats,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.run, self.executor, self.policy = model, run, executor, policy
        self.batched = max_batch_size > 0
        self.slots = max(1, max_batch_size)
        self.output_names = output_names
        self.stats, self.clock = stats, clock
        self.sequences: dict[SequenceId, Sequence] = {}  # by id: the current sequence of each id
        self._live: list[Sequence] = []  # every sequence with a slot or waiting for one, oldest first
        self._free = list(range(self.slots))
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # set while nothing is queued or running
        self._task: asyncio.Task | None = None
        self.accepting = True

    # ------------------------------------------------------------------ admission

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"sequence-batcher:{self.model}")

    def submit(self, *, inputs: Feeds, rows: int, parameters: dict,
               client_gone: Callable[[], bool] | None = None) -> asyncio.Future:
        if not self.accepting:
            raise ModelNotReady(f"model {self.model!r} is unloading; not accepting new requests")
        sid, start, end = sequence_flags(parameters, model=self.model)
        for control in self.policy.controls:  # a CORRID the model cannot take fails now, not in its batch
            if control.kind == "CORRID":
                corrid_value(sid, dtype=control.dtype, model=self.model)
        if self.batched and rows != 1:
            raise InvalidInput(f"model {self.model!r} uses sequence batching: each request carries one step of "
                               f"one sequence (batch size 1), got batch size {rows}")
        seq = self.sequences.get(sid)
        if start:
            if seq is not None:
                seq.closing = True  # a new START ends the previous sequence of this id, as Triton does
                if not seq.steps and seq.idle_timer is not None:
                    seq.idle_timer.cancel()
                    self._release(seq)
            seq = Sequence(sid)
            self.sequences[sid] = seq
            self._live.append(seq)
        elif seq is None or seq.closing:
            raise InvalidInput(f"inference request for sequence {sid} to model '{self.model}' must specify the "
                               "START flag on the first request of the sequence (the sequence is unknown, ended or "
                               "was released after being idle)")
        if seq.idle_timer is not None:
            seq.idle_timer.cancel()
            seq.idle_timer = None
        if end:
            seq.closing = True
        fut = asyncio.get_running_loop().create_future()
        self._drained.clear()
        seq.steps.append(Step(inputs, start, end, fut, self.clock(), client_gone))
        self.stats.on_queue_change(self.pending())
        self._wake.set()
        return fut

    def pending(self) -> int:
        return sum(len(s.steps) for s in self._live)

    # ------------------------------------------------------------------ slots and release

    def _assign_slots(self) -> None:
        for seq in self._live:
            if seq.slot is None and seq.steps and self._free:
                seq.slot = self._free.pop(0)

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self._free.append(seq.slot)
            self._free.sort()
            seq.slot = None
        seq.state.clear()
        if seq in self._live:
            self._live.remove(seq)
        if self.sequences.get(seq.id) is seq:
            del self.sequences[seq.id]
        self._wake.set()

    def _after_step(self, seq: Sequence) -> None:
        if seq.steps:
            return
        if seq.closing:
            self._release(seq)
        else:
            seq.idle_timer = asyncio.get_running_loop().call_later(self.policy.idle_s, self._idle, seq)

    def _idle(self, seq: Sequence) -> None:
        if not seq.steps:
            log.info("model %s: sequence %s idle for %.3f s; released", self.model, seq.id, self.policy.idle_s)
            self._release(seq)

    # ------------------------------------------------------------------ batch loop

    async def _loop(self) -> None:
        while True:
            self._drop_hung_up()
            self._assign_slots()
            ready = [s for s in self._live if s.slot is not None and s.steps]
            if not ready:
                if not self.pending():
                    self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            ready = await self._wait_for_more(ready)
            await self._run_batch(ready)

    async def _wait_for_more(self, ready: list[Sequence]) -> list[Sequence]:
        """Wait up to max_queue_delay from the oldest waiting step for more sequences to have a step."""
        target = self.policy.preferred_batch_sizes[-1] if self.policy.preferred_batch_sizes else self.slots
        end = min(s.steps[0].enqueued for s in ready) + self.policy.max_queue_delay_s
        while len(ready) < min(target, self.slots) and (remaining := end - self.clock()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
            self._assign_slots()
            ready = [s for s in self._live if s.slot is not None and s.steps]
        return ready

    def _drop_hung_up(self) -> None:
        for seq in self._live:
            while seq.steps and seq.steps[0].client_gone is not None and seq.steps[0].client_gone():
                step = seq.steps.popleft()
                if not step.future.done():
                    step.future.set_exception(RequestCancelled("client went away while its request was queued"))

    def _batch_rows(self, ready: list[Sequence]) -> list[Sequence | None]:
        """The batch's rows: by slot for `direct` (None: a slot with nothing to run), by age for `oldest`."""
        key = _shape_key(ready[0].steps[0].inputs)
        chosen = [s for s in ready if _shape_key(s.steps[0].inputs) == key]
        if self.policy.strategy == "oldest" or not self.batched:
            chosen.sort(key=lambda s: s.steps[0].enqueued)
            return list(chosen[: self.slots if self.batched else 1])
        by_slot = {s.slot: s for s in chosen if s.slot is not None}
        return [by_slot.get(i) for i in range(max(by_slot) + 1)]

    async def _run_batch(self, ready: list[Sequence]) -> None:
        rows = self._batch_rows(ready)
        running = {id(s): s.steps.popleft() for s in rows if s is not None}
        live = [s for s in rows if s is not None]
        self.stats.on_queue_change(self.pending())
        started = self.clock()
        try:
            template = next(iter(running.values())).inputs
            feeds = self._feeds(rows, running=running, template=template)
            outputs, timings = await asyncio.get_running_loop().run_in_executor(self.executor, self._run, feeds)
        except Exception as exc:
            err = exc if isinstance(exc, ServingError) else BackendError(
                f"model {self.model!r}: inference failed: {exc}")
            for seq in live:
                if not running[id(seq)].future.done():
                    running[id(seq)].future.set_exception(err)
                self._after_step(seq)
            return
        self.stats.on_execution(len(live), timings)
        for i, row in enumerate(rows):
            if row is None:
                continue
            step = running[id(row)]
            rows_of = slice(i, i + 1) if self.batched else slice(None)
            for state in self.policy.states:
                row.state[state.output_name] = outputs[state.output_name][rows_of]
            part = {n: outputs[n][rows_of] for n in self.output_names}
            if not step.future.done():
                step.future.set_result(BatchResult(part, started - step.enqueued, len(live), timings))
            self._after_step(row)

    def _run(self, feeds: Feeds) -> tuple[dict[str, np.ndarray], tuple[int, int, int]]:
        names = self.output_names + [s.output_name for s in self.policy.states]
        outputs, infer_ns, output_ns = self.run(feeds, names)
        return outputs, (0, infer_ns, output_ns)

    def _feeds(self, rows: list[Sequence | None], *, running: dict[int, Step], template: Feeds) -> Feeds:
        """Client inputs, control inputs and state inputs for every row (idle direct slots: zeros, READY=0)."""
        per_row = [self._row(seq, running.get(id(seq)) if seq is not None else None, template) for seq in rows]
        if not self.batched:
            return per_row[0]
        return {name: np.concatenate([r[name] for r in per_row], axis=0) for name in per_row[0]}

    def _row(self, seq: Sequence | None, step: Step | None, template: Feeds) -> Feeds:
        lead = [1] if self.batched else []
        if step is None:
            feeds = {n: np.zeros_like(a) if a.dtype != np.object_ else np.full(a.shape, b"", dtype=object)
                     for n, a in template.items()}
        else:
            feeds = dict(step.inputs)
        for c in self.policy.controls:
            flag = {"START": bool(step and step.start), "END": bool(step and step.end),
                    "READY": step is not None}.get(c.kind, False)
            value = c.value(flag=flag, corrid=seq.id if (seq is not None and step is not None) else 0)
            feeds[c.name] = np.full([*lead, 1], value, dtype=c.dtype)
        for s in self.policy.states:
            stored = seq.state.get(s.output_name) if (seq is not None and step is not None and not step.start) \
                else None
            if stored is None:
                init = s.initial if s.initial is not None else np.zeros(s.dims, dtype=s.dtype)
                stored = init.reshape(lead + list(init.shape))
            feeds[s.input_name] = stored
        return feeds

    # ------------------------------------------------------------------ shutdown

    async def close(self, *, grace_s: float) -> None:
        self.accepting = False
        try:
            await asyncio.wait_for(self._drained.wait(), grace_s)
        except TimeoutError:
            log.warning("model %s: %d sequence request(s) still queued after %.1f s; failing them",
                        self.model, self.pending(), grace_s)
        for seq in list(self._live):
            for step in seq.steps:
                if not step.future.done():
                    step.future.set_exception(ModelNotReady(f"model {self.model!r} was unloaded"))
            seq.steps.clear()
            if seq.idle_timer is not None:
                seq.idle_timer.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _shape_key(inputs: Feeds) -> tuple:
    return tuple((n, a.shape, a.dtype.str) for n, a in sorted(inputs.items()))
