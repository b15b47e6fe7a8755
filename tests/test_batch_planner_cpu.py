"""The adaptive planner's CPU-aware decision: a batch's fixed CPU, paid by everyone in flight, is worth waiting for.

Every test drives the planner with a fake clock and made-up observations, so each decision follows from the
arithmetic alone: a lone client is sent at once, a crowd under a steady arrival rate with a big fixed CPU cost per
batch waits (up to Triton's bound, never beyond), and the CPU fit is taken from the process CPU clock per batch.
"""

from __future__ import annotations

import pytest

from service.batch_planner import Planner

BOUND_S = 0.003  # Triton's max_queue_delay: the adaptive wait's upper bound


def _planner(*, b_cpu: float, a_cpu: float = 50e-6, b_wall: float = 0.0, a_wall: float = 30e-6) -> Planner:
    """A planner that has seen batches of 1..8 rows with the given costs (wall per run, process CPU per batch)."""
    planner = Planner()
    for rows in (1, 2, 4, 8) * 4:
        planner.cost.observe(rows, a_wall * rows + b_wall)
        planner.cpu_cost.observe(rows, a_cpu * rows + b_cpu)
    return planner


def _steady(planner: Planner, *, gap: float, count: int, crowd: int, start: float = 0.0) -> float:
    """`count` arrivals `gap` apart, each finding `crowd` others in the server; returns the last arrival's time."""
    t = start
    for i in range(count):
        t = start + i * gap
        planner.observe_arrival(t, others=crowd)
    return t


def _fill(planner: Planner, *, now: float, gap: float, crowd: int, max_rows: int = 64) -> tuple[int, float]:
    """Run the collector's loop against a fake clock: each wait the planner asks for either sees the next arrival
    of a steady stream (rows + 1) or runs out. Returns (rows dispatched, seconds waited)."""
    first, rows, t = now, 1, now
    next_arrival = now + gap
    while rows < max_rows:
        wait = planner.plan(rows=rows, others_in_flight=0, now=t, waited=t - first, remaining=first + BOUND_S - t)
        if wait <= 0:
            break
        if next_arrival <= t + wait:
            t = next_arrival
            planner.observe_arrival(t, others=crowd)
            next_arrival += gap
            rows += 1
        else:
            t += wait
    return rows, t - first


def test_a_lone_client_is_sent_at_once_even_with_a_big_fixed_cpu_cost():
    planner = _planner(b_cpu=500e-6)  # a batch's fixed CPU far above a run's wall time
    # A closed loop of one: each request arrives after the previous answer, so it never finds anyone in the server.
    last = _steady(planner, gap=0.0007, count=20, crowd=0)
    assert planner.cpu_cost.fit()[1] == pytest.approx(500e-6)  # type: ignore[index]
    assert planner.plan(rows=1, others_in_flight=0, now=last, waited=0.0, remaining=BOUND_S) == 0.0
    assert _fill(planner, now=last, gap=0.0007, crowd=0) == (1, 0.0)


def test_a_crowd_at_a_steady_rate_waits_up_to_the_bound_when_the_fixed_cpu_is_big():
    planner = _planner(b_cpu=200e-6)
    last = _steady(planner, gap=0.0002, count=20, crowd=31)  # 32 clients, one arrival every 0.2 ms
    # 1 row x 0.2 ms of waiting < 200 us of CPU that 31 others would queue behind: wait, until the rule itself would
    # stop without an arrival (here after three gaps of silence, when the crowd would count as gone).
    assert planner.plan(rows=1, others_in_flight=0, now=last, waited=0.0, remaining=BOUND_S) == pytest.approx(0.0006)
    rows, waited = _fill(planner, now=last, gap=0.0002, crowd=31)
    assert waited == pytest.approx(BOUND_S)  # 31 x 200 us = 6.2 ms of CPU saved outweighs any row count here
    assert rows == 16  # every arrival within the 3 ms bound joined


def test_the_wait_is_never_beyond_the_bound():
    planner = _planner(b_cpu=0.05)  # a huge fixed cost: every wait looks worth it
    last = _steady(planner, gap=0.001, count=20, crowd=31)
    for remaining in (BOUND_S, 0.0004, 1e-6):
        wait = planner.plan(rows=1, others_in_flight=5, now=last, waited=BOUND_S - remaining, remaining=remaining)
        assert 0 < wait <= remaining
    assert planner.plan(rows=1, others_in_flight=5, now=last, waited=BOUND_S, remaining=0.0) <= 0
    # A stream slower than the bound: the loop still stops at the bound, whatever the arrivals do.
    rows, waited = _fill(planner, now=last, gap=0.01, crowd=31)
    assert (rows, waited) == (1, pytest.approx(BOUND_S))


def test_a_small_fixed_cpu_stops_the_wait_once_enough_rows_share_it():
    planner = _planner(b_cpu=20e-6)
    last = _steady(planner, gap=0.0002, count=20, crowd=31)
    rows, waited = _fill(planner, now=last, gap=0.0002, crowd=31)
    # Waiting one more gap costs rows x 0.2 ms; it saves 31 x 20 us = 0.62 ms: worth it up to 3 rows, not 4.
    assert rows == 4 and waited == pytest.approx(0.0006)


def test_a_crowd_that_has_gone_no_longer_holds_a_lone_request():
    planner = _planner(b_cpu=500e-6)
    last = _steady(planner, gap=0.0002, count=16, crowd=31)
    # Load dropped to one client: the next request comes 10 ms later (well past three expected gaps).
    now = last + 0.010
    planner.observe_arrival(now, others=0)
    assert planner.crowd(0, now=now + 0.001) == 0
    assert planner.plan(rows=1, others_in_flight=0, now=now + 0.001, waited=0.0, remaining=BOUND_S) == 0.0


def test_cpu_samples_come_from_the_process_clock_between_batch_ends():
    planner = Planner()
    cpu = wall = 0.0
    for rows in (1, 4, 2, 8, 1, 4):
        cpu += 80e-6 + 50e-6 * rows  # what the process spent on this batch, all threads
        wall += 0.001
        planner.observe_batch(units=rows, wall_s=30e-6 * rows, cpu_now=cpu, wall_now=wall)
    a, b = planner.cpu_cost.fit()  # type: ignore[misc]
    assert a == pytest.approx(50e-6) and b == pytest.approx(80e-6)
    assert len(planner.cpu_cost.samples) == 5  # the first batch end only starts the clock
    # A batch after a long idle spell is not a sample: that CPU went to housekeeping, not to the batch.
    planner.observe_batch(units=3, wall_s=90e-6, cpu_now=cpu + 0.2, wall_now=wall + 5.0)
    assert len(planner.cpu_cost.samples) == 5
