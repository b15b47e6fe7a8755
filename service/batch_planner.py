"""Adaptive batching: how long a forming batch should wait, decided from what the batcher has observed.

Triton's `max_queue_delay` is a fixed wait: a lone request at concurrency 1 waits it out in full for batch-mates
who never come. The planner keeps Triton's knobs as upper bounds and decides each wait from three observations:
  * requests in flight (waiting + running): a closed-loop client resends when its answer comes back, so others
    in flight are the likeliest source of a batch-mate;
  * the arrival rate, as an EWMA of inter-arrival times;
  * the cost of a batch as a function of its rows, a least-squares fit `a*n + b` over recent batches (the idea
    of BentoML's dispatcher: `b` is what a request saves by sharing a run instead of paying for its own).
Waiting for the next arrival costs every waiting row that long; it gains about `b` (one run's fixed cost not
paid again). So the batch waits while `rows * (waited + expected_gap) < b`, and not at all when nobody else is
in flight and the next arrival is expected later than that gain.

The run's wall time misses most of what a batch costs a CPU-bound server: each batch also pays a fixed amount of
the process's CPU outside the run (event-loop hand-offs, worker-thread and ONNX Runtime thread wake-ups; ~80 us on
the tiny zoo `cnn` against a 30 us run). So a second fit, `cpu = a_cpu * n + b_cpu`, is taken on the process CPU
time spent per batch (all threads, from one batch's end to the next), and on a busy server that fixed CPU is paid
by everyone in flight: every request queued behind it waits that long for the CPU. While others are in flight
(the crowd: requests queued or running now, or the most seen at recent arrivals), a batch also waits for the next
arrival while `rows * expected_gap < b_cpu * crowd`: one more row joining saves one batch's fixed CPU for all of
them. A lone client has no crowd (a closed loop never arrives while its own request is in the server), so it is
still sent at once.

Written here rather than taken from a library: no maintained package offers a batching cost model that is not
tied to its own server (BentoML's lives inside its runner).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import numpy as np

# A batch-cost sample older than this many batches no longer describes the model's load.
_COST_WINDOW = 64
# Inter-arrival smoothing: 0.2 follows a change in load within ~5 arrivals without chasing single outliers.
_ARRIVAL_ALPHA = 0.2
# A CPU sample spanning more than this since the previous batch also holds idle-time housekeeping (polls, scrapes).
_CPU_SAMPLE_MAX_S = 0.5
# Arrivals whose crowd still counts: a closed loop of 32 clients shows its size within a few arrivals, and a load
# that drops to one client stops counting as a crowd after this many.
_CROWD_WINDOW = 16
# Silence, in expected inter-arrival gaps or batch-to-batch intervals (the longer), after which a crowd seen before
# no longer counts. Gaps alone were too short a scale for a closed loop: its requests come back in bursts after each
# batch's answers, so the silence between bursts outlasted three in-burst gaps, the crowd was forgotten every cycle
# and the burst's first request went alone (at concurrency 8, batches of 1 then 7 instead of 8).
_CROWD_GONE_GAPS = 3
# Length-aware models: runs, and distinct padded sizes among them, before their own CPU budgets any padding.
_PAD_MIN_SAMPLES = 8
_PAD_MIN_SIZES = 3
# The shortest wait worth a timer: a burst's gaps are ~0, and a zero wait would dispatch it one request at a time.
_MIN_WAIT_S = 50e-6


class DispatchReason(str, enum.Enum):
    """Why a batch left the queue: bounded label values for the dispatch metrics."""

    FULL = "full"  # max_batch_size rows
    PREFERRED = "preferred"  # the largest preferred batch size
    DELAY = "delay"  # max_queue_delay ran out
    ADAPTIVE = "adaptive"  # the planner judged waiting longer not worth it
    UNBATCHED = "unbatched"  # the model has no dynamic batching


@dataclass
class CostModel:
    """Least-squares `seconds = a * units + b` over the most recent batches.

    Units are rows, or for a length-aware model padded tokens (rows x padded length): its cost follows those.
    """

    samples: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=_COST_WINDOW))
    sizes: int = 0  # distinct unit counts among the samples, as of the last fit
    _fit: tuple[float, float] | None = None

    def observe(self, rows: int, seconds: float) -> None:
        self.samples.append((rows, max(seconds, 0.0)))
        self._fit = None

    def fit(self) -> tuple[float, float] | None:
        """(a, b), or None before any batch ran. One batch size seen only: nothing tells the fixed part from the
        per-unit part, so none of it counts as fixed (no gain is promised that was never measured; a lone
        client would otherwise wait for batch-mates on the strength of its own run time)."""
        if not self.samples:
            return None
        if self._fit is None:
            rows, cost = np.array(self.samples, dtype=np.float64).T
            self.sizes = len(set(rows.tolist()))
            if self.sizes == 1:
                self._fit = (float(cost.mean() / max(rows[0], 1.0)), 0.0)
            else:
                # The closed-form least-squares line: np.polyfit's SVD cost ~5x more, once per batch per model.
                dx = rows - rows.mean()
                a = float(dx @ (cost - cost.mean()) / (dx @ dx))
                b = float(cost.mean() - a * rows.mean())
                # Noise can tilt the line below zero; a batch never costs less than nothing per row or per run.
                self._fit = (max(a, 0.0), max(b, 0.0))
        return self._fit

    def predict(self, rows: int) -> float | None:
        fit = self.fit()
        return None if fit is None else fit[0] * rows + fit[1]


@dataclass
class ArrivalRate:
    """EWMA of the gaps between arrivals."""

    last: float | None = None
    gap: float | None = None

    def observe(self, now: float) -> None:
        if self.last is not None:
            gap = max(now - self.last, 0.0)
            self.gap = gap if self.gap is None else (1 - _ARRIVAL_ALPHA) * self.gap + _ARRIVAL_ALPHA * gap
        self.last = now

    def until_next(self, now: float) -> float | None:
        """Expected seconds until the next arrival. An overdue one is at least one gap away, and at least as far
        as the silence so far: a wait that saw nobody come stops looking worth it."""
        if self.gap is None or self.last is None:
            return None
        due = self.last + self.gap - now
        return due if due > 0 else max(self.gap, now - self.last)


@dataclass
class CpuClock:
    """Turns readings of the process CPU clock at each batch's end into per-batch CPU samples."""

    last_cpu: float | None = None
    last_wall: float | None = None

    def sample(self, *, cpu: float, wall: float) -> float | None:
        """CPU seconds since the previous batch ended, or None when there is none or it was idle too long ago."""
        spent = None
        if self.last_cpu is not None and self.last_wall is not None and wall - self.last_wall <= _CPU_SAMPLE_MAX_S:
            spent = max(cpu - self.last_cpu, 0.0)
        self.last_cpu, self.last_wall = cpu, wall
        return spent


@dataclass
class Planner:
    """Decides, for a forming batch, how much longer to wait for batch-mates (0: dispatch now)."""

    cost: CostModel = field(default_factory=CostModel)  # wall seconds of a run
    arrivals: ArrivalRate = field(default_factory=ArrivalRate)
    cpu_cost: CostModel = field(default_factory=CostModel)  # process CPU seconds per batch, all threads
    cpu_clock: CpuClock = field(default_factory=CpuClock)
    # Requests already in the server (queued or running) when each recent request arrived.
    crowds: deque[int] = field(default_factory=lambda: deque(maxlen=_CROWD_WINDOW))
    # Length-aware models: CPU of the run itself (ONNX Runtime's threads), per padded token; budgets the padding.
    run_cpu: CostModel = field(default_factory=CostModel)
    # EWMA of the time between batch ends (busy spells only): a closed loop's cycle.
    batch_ends: ArrivalRate = field(default_factory=ArrivalRate)

    def _crowd_gone_after(self) -> float | None:
        """The silence since the last arrival after which the crowd seen before has gone (None: nothing seen)."""
        gap = self.arrivals.gap
        return None if gap is None else _CROWD_GONE_GAPS * max(gap, self.batch_ends.gap or 0.0)

    def _crowd_gone(self, now: float) -> bool:
        last, after = self.arrivals.last, self._crowd_gone_after()
        return last is not None and after is not None and now - last > after

    def observe_arrival(self, now: float, *, others: int) -> None:
        if self._crowd_gone(now):
            self.crowds.clear()
        self.arrivals.observe(now)
        self.crowds.append(others)

    def observe_batch(self, *, units: int, wall_s: float, cpu_now: float, wall_now: float) -> None:
        """A batch of `units` ran in `wall_s`; `cpu_now` is the process CPU clock (time.process_time) at its end."""
        self.cost.observe(units, wall_s)
        cpu = self.cpu_clock.sample(cpu=cpu_now, wall=wall_now)
        if cpu is not None:
            self.cpu_cost.observe(units, cpu)
            self.batch_ends.observe(wall_now)
        else:  # the first batch, or the first after an idle spell: the interval is idleness, not the loop's cycle
            self.batch_ends.last = wall_now

    def crowd(self, others_in_flight: int, *, now: float) -> int:
        """Requests that a batch's fixed CPU delays: those in flight now, or the most seen at recent arrivals
        unless, with nobody in flight, the next arrival is overdue by a few gaps (the crowd has gone)."""
        if others_in_flight == 0 and self._crowd_gone(now):
            return 0
        return max(others_in_flight, max(self.crowds, default=0))

    def wait_s(self, *, rows: int, others_in_flight: int, now: float, waited: float = 0.0) -> float:
        """Seconds worth waiting for one more arrival; `plan` caps it at max_queue_delay.

        `waited`: how long the batch's oldest request has waited already. The whole wait counts against the
        run's wall-time gain, so for that gain a batch never waits longer in all than the run cost it would save
        (`b / rows`). The CPU gain is marginal: each row that joins saves a batch's fixed CPU for the whole crowd.
        """
        fit = self.cost.fit()
        gap = self.arrivals.until_next(now)
        gain = self._cpu_gain(others_in_flight, now=now)
        if gap is not None and gain > gap * rows:
            # A busy server: a run's fixed CPU costs the crowd more than the wait. Wait until this rule itself
            # would stop (an arrival wakes the wait sooner): waiting one expected gap at a time gave the same
            # decisions for twice the collector's wake-ups at concurrency 32.
            return max(gap, self._cpu_horizon(gain, rows=rows, others_in_flight=others_in_flight) - now, _MIN_WAIT_S)
        if others_in_flight == 0 and (fit is None or gap is None or (waited + gap) * rows >= fit[1]):
            return 0.0  # nobody else is coming soon enough to be worth it
        if fit is None or gap is None:
            return float("inf")  # others in flight but nothing learned yet: Triton's wait
        return max(gap, _MIN_WAIT_S) if (waited + gap) * rows < fit[1] else 0.0

    def _cpu_horizon(self, gain: float, *, rows: int, others_in_flight: int) -> float:
        """When, with no arrival, `gain > rows * until_next` stops holding: the silence since the last arrival
        reaches gain / rows, or, with nobody in flight, the crowd counts as gone."""
        last = self.arrivals.last or 0.0
        end = last + gain / rows
        after = self._crowd_gone_after()
        if others_in_flight == 0 and after is not None:
            end = min(end, last + after)
        return end

    def _cpu_gain(self, others_in_flight: int, *, now: float) -> float:
        fit = self.cpu_cost.fit()
        return 0.0 if fit is None else fit[1] * self.crowd(others_in_flight, now=now)

    def plan(self, *, rows: int, others_in_flight: int, now: float, waited: float, remaining: float) -> float:
        """The wait for one more arrival, never beyond `remaining` (what is left of Triton's max_queue_delay)."""
        if remaining <= 0:
            return remaining
        return min(remaining, self.wait_s(rows=rows, others_in_flight=others_in_flight, now=now, waited=waited))

    def max_padding(self) -> float:
        """For a length-aware model (cost fitted per padded token): the padding, in tokens, worth one run's fixed
        cost; none before two batch sizes were seen."""
        model = self.cost
        if self.run_cpu.samples:  # the batcher measures each run's own CPU: budget on that, once it is steady
            model = self.run_cpu
            model.fit()
            if len(model.samples) < _PAD_MIN_SAMPLES or model.sizes < _PAD_MIN_SIZES:
                return 0.0  # a line through two noisy runs promised ~inf tokens and padded a cold server to 50 rows/s
        fit = model.fit()
        if fit is None or model.sizes < 2:
            # Nothing to go by yet: pad nothing (equal lengths still stack). Unpadded runs of different lengths
            # teach the fit; padding blind cost 0.76 s for one 30 x 135 batch of the zoo transformer.
            return 0.0
        a, b = fit
        return b / a if a > 0 else float("inf")

    def can_meet(self, *, deadline: float | None, units: int, now: float) -> bool:
        """False when a batch of `units` (rows, or padded tokens) is predicted to end after `deadline`."""
        if deadline is None:
            return True
        predicted = self.cost.predict(units)
        return predicted is None or now + predicted <= deadline
