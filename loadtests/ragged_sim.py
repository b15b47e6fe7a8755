"""Length-aware grouping in virtual time: how the queue's order alone shapes latency, free of this box's noise.

A closed loop of `--clients` sends mixed-length texts (the lengths of loadtests.textbench's set) through the real
AdmissionQueue and service/length_groups.py; one instance runs each batch at once for `a * rows * padded_length +
b` seconds (b: a run's fixed cost, the thing batching shares; the padding budget is b / a, as the planner's).
Prints rows/s, p50, p99 and mean batch per policy, averaged over seeds:

    python -m loadtests.ragged_sim --fixed-ms 2,6,12 --clients 8,32,64 [--policies plain,served,window,...]

plain = equal lengths only (FIFO head), served = service/length_groups.py as it is now; the others are the
choosers of loadtests/ragged_policies.py (whole = round 3, window = round 4, ...), and `--shares` adds windows of
other fractions.
No clock, no threads: every figure follows from the grouping rules, so differences between policies are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from loadtests import ragged_policies
from service import batch_queue, length_groups
from service.batch_queue import AdmissionQueue, PendingRequest


@dataclass
class Result:
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    max_ms: float


def _lengths(count: int, *, seed: int) -> list[int]:
    """Token counts like loadtests.textbench.docstrings: 3-115 words, plus the two special tokens."""
    rng = np.random.default_rng(seed)
    return [int(rng.integers(3, 116)) + 2 for _ in range(count)]


async def closed_loop(*, by_length: bool, texts: int, clients: int, seed: int, a_s: float, b_s: float,
                      max_rows: int = 32, max_tokens: int = 4096) -> Result:
    """Every text once, `clients` in flight; a batch runs as soon as the previous one ends (a saturated server)."""
    lengths = _lengths(texts, seed=seed)
    loop = asyncio.get_running_loop()
    queue = AdmissionQueue(max_size=0)
    waiting: list[PendingRequest] = []  # the queue's contents, for the pass count of rounds 3-4's policies
    ragged_policies.PASSES.reset()
    now, sent, latencies, batches = 0.0, 0, [], 0

    def arrive() -> None:
        nonlocal sent
        if sent < texts:
            length = lengths[sent]
            # Length-aware: the length is not part of the shape; equal lengths only: it is.
            key = ("input_ids",) if by_length else ("input_ids", length)
            req = PendingRequest(inputs={}, rows=1, shape_key=key, future=loop.create_future(), enqueued=now,
                                 length=length)
            queue.put(req, model="text")
            waiting.append(req)
            sent += 1

    for _ in range(clients):
        arrive()
    while len(queue):
        taken, rows = queue.compatible(max_rows=max_rows, by_length=by_length, max_tokens=max_tokens,
                                       max_padding=b_s / a_s)
        queue.remove(taken)
        waiting[:] = [r for r in waiting if all(r is not t for t in taken)]
        ragged_policies.PASSES.dispatched(taken, waiting)
        now += a_s * rows * max(r.length for r in taken) + b_s
        batches += 1
        for r in taken:
            latencies.append(now - r.enqueued)
            arrive()
    lat = np.asarray(latencies) * 1e3
    return Result(texts / now, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), texts / batches,
                  float(lat.max()))


@contextlib.contextmanager
def choosing(chooser: ragged_policies.Chooser | None) -> Iterator[None]:
    """The queue picks length-aware groups with `chooser` (None: service/length_groups.py's next_group)."""
    saved = batch_queue.next_group
    batch_queue.next_group = chooser or length_groups.next_group  # type: ignore[assignment]
    try:
        yield
    finally:
        batch_queue.next_group = saved  # type: ignore[assignment]


def _policies(names: list[str], shares: list[int]) -> dict[str, tuple[bool, ragged_policies.Chooser | None]]:
    """name -> (length-aware, chooser); "served" is service/length_groups.py as it stands."""
    known: dict[str, tuple[bool, ragged_policies.Chooser | None]] = {"plain": (False, None), "served": (True, None)}
    known.update({name: (True, chooser) for name, chooser in ragged_policies.POLICIES.items()})
    known.update({f"share 1/{s}": (True, ragged_policies.window(s, length_groups.MIN_WINDOW)) for s in shares})
    known.update({n: (True, chooser) for n in names if (chooser := ragged_policies.parse(n)) is not None})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; expected some of {sorted(known)}")
    return {n: known[n] for n in names + [f"share 1/{s}" for s in shares]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.ragged_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixed-ms", default="2,6,12", help="comma-separated fixed cost of a run (b), ms")
    p.add_argument("--token-us", type=float, default=180.0, help="cost per padded token (a), us")
    p.add_argument("--clients", default="32", help="comma-separated closed-loop concurrencies")
    p.add_argument("--texts", type=int, default=480)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--policies", default="plain,served,whole,window", help="comma-separated policy names")
    p.add_argument("--shares", default="", help="more window fractions to try, e.g. 2,4")
    args = p.parse_args(argv)
    policies = _policies(args.policies.split(","), [int(s) for s in args.shares.split(",") if s])
    print("| clients | fixed ms | policy | rows/s | p50 ms | p99 ms | p99 per seed | max ms | mean batch |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for clients in (int(c) for c in args.clients.split(",")):
        for fixed in (float(f) for f in args.fixed_ms.split(",")):
            for name, (by_length, chooser) in policies.items():
                with choosing(chooser):
                    runs = [asyncio.run(closed_loop(by_length=by_length, texts=args.texts, clients=clients, seed=s,
                                                    a_s=args.token_us * 1e-6, b_s=fixed * 1e-3))
                            for s in range(args.seeds)]
                mean = np.mean([[r.rows_per_s, r.p50_ms, r.p99_ms, r.max_ms, r.mean_batch] for r in runs], axis=0)
                per_seed = " ".join(f"{r.p99_ms:.0f}" for r in runs)
                print(f"| {clients} | {fixed:g} | {name} | {mean[0]:.1f} | {mean[1]:.0f} | {mean[2]:.0f} | {per_seed} "
                      f"| {mean[3]:.0f} | {mean[4]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
