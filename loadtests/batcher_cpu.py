"""The batcher's own CPU per request (queue, grouping, padding, slicing, planner) with a model that does nothing.

    python -m loadtests.batcher_cpu [--requests 3000] [--rounds 3]

32 callers keep one mixed-length text (5-118 tokens) each in flight against the real `Batcher` on a no-op run, so
the process CPU per request is the batching machinery alone, without HTTP or ONNX Runtime: what length-aware
grouping costs next to shapes-must-match batching. Run it from two checkouts (PYTHONPATH) to compare versions.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batch_queue import Feeds
from service.batcher import Batcher
from service.modelrepo.config import BatchingPolicy
from service.ragged import RaggedPolicy

CASES = {"plain": (False, False), "plain+adaptive": (False, True), "ragged": (True, False),
         "ragged+adaptive": (True, True)}
_POLICY = BatchingPolicy(max_queue_delay_us=500, preferred_batch_sizes=(16, 32))  # the zoo transformer's


def _run(feeds: Feeds) -> tuple[dict[str, np.ndarray], int, int]:
    return {"embedding": np.zeros((feeds["input_ids"].shape[0], 384), np.float32)}, 0, 0


async def cpu_us_per_request(*, ragged: bool, adaptive: bool, requests: int, concurrency: int = 32) -> float:
    policy = RaggedPolicy(pad_values={"input_ids": 0, "attention_mask": 0}) if ragged else None
    batcher = Batcher(model="text", run=_run, executor=ThreadPoolExecutor(1), policy=_POLICY, max_batch_size=64,
                      concurrency=1, adaptive=adaptive, ragged=policy)
    batcher.start()
    lengths = [int(n) for n in np.random.default_rng(0).integers(5, 119, size=requests)]

    async def caller() -> None:
        while lengths:
            x = np.ones((1, lengths.pop()), np.int64)
            await batcher.submit(inputs={"input_ids": x, "attention_mask": x}, rows=1, timeout_s=None)

    cpu0 = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    spent = time.process_time() - cpu0
    await batcher.close(grace_s=1)
    return spent / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.batcher_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    for r in range(args.rounds):
        cells = {name: asyncio.run(cpu_us_per_request(ragged=rg, adaptive=ad, requests=args.requests))
                 for name, (rg, ad) in CASES.items()}
        print(f"round {r + 1}: " + ", ".join(f"{name} {us:.0f} us/request" for name, us in cells.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
