"""Preparing rows for the model (decode, lay out, tokenise): where and how, so the model never waits on it.

- Files to decode (PNG/JPEG) go to a process pool sized to the cores, a model batch per task, submitted a
  window ahead: decoding and the per-image numpy work hold the GIL, so threads would not overlap them.
- Trivial rows (user ids, in-memory .npy rows) and WAVs (`prepare_inline`) are prepared inline: a pool's
  hand-offs cost more than the work.
- Text is tokenised in a few thread slices (the tokenizer releases the GIL), a whole window at a time.
A processor with `prepare_batch` (images) prepares a batch with one array op per step instead of one per row.
"""

from __future__ import annotations

import gc
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from service.errors import ServingError
from service.processing.base import Processor

# (prepared, None) for a row that is ready, (None, why) for one that is not.
Ready = tuple[Any, str | None]


def error_message(exc: BaseException) -> str:
    if isinstance(exc, ServingError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"  # an unexpected failure on one row is still only that row's


def prepare_one(processor: Processor, item) -> Ready:
    if item.error is not None:
        return None, item.error
    try:
        return processor.prepare(item.payload, index=item.row), None
    except Exception as exc:
        return None, error_message(exc)


def prepare_rows(processor: Processor, items: Sequence) -> list[Ready]:
    """Every item prepared or its error, in order: through `prepare_batch` where the processor has one."""
    batch: Callable | None = getattr(processor, "prepare_batch", None)
    todo = [i for i, it in enumerate(items) if it.error is None]
    if batch is None or not todo:
        return [prepare_one(processor, it) for it in items]
    out: list[Ready] = [(None, it.error) for it in items]
    try:
        results = batch([items[i].payload for i in todo], indices=[items[i].row for i in todo])
    except Exception:  # the batch path failed as a whole: row by row, so only the bad row fails
        return [prepare_one(processor, it) for it in items]
    for i, result in zip(todo, results, strict=True):
        out[i] = (None, error_message(result)) if isinstance(result, Exception) else (result, None)
    return out


def prepare_slices(processor: Processor, items: list, *, pool: Executor | None, workers: int) -> list[Ready]:
    """Prepare in a few contiguous slices (one task per worker), so cheap rows do not pay a task each."""
    if pool is None or workers < 2 or len(items) < 2:
        return prepare_rows(processor, items)
    step = -(-len(items) // workers)
    slices = pool.map(lambda s: prepare_rows(processor, items[s:s + step]), range(0, len(items), step))
    return [r for part in slices for r in part]


def decodes_files(items: Sequence) -> bool:
    """True where rows are files to decode (bytes): the work a process pool pays for."""
    return any(isinstance(it.payload, bytes) for it in items)


def prepares_inline(processor: Processor) -> bool:
    """Whether the processor's file rows cost less to prepare than any hand-off (`prepare_inline`, e.g. WAVs)."""
    return bool(getattr(processor, "prepare_inline", False))


class DecodePool:
    """Worker processes that prepare file rows (the model's processor travels with each batch: a few hundred
    bytes of settings and labels).

    NOTE: "fork" on Linux. `modelserve predict` starts the workers before it loads the model, while the process
    has no other thread (forking a threaded process can deadlock the child); an engine that meets files only
    later forks with ONNX Runtime's threads alive, which the workers never touch (see the gc note below).
    "forkserver" or "spawn" would make every worker re-import the main module (for `modelserve` the whole
    server: ~2 s per job on a busy machine; the fork server's `__main__` preload does not take effect in
    Python 3.11), which costs more than a small job's decoding.
    """

    def __init__(self, *, workers: int) -> None:
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        # Garbage is collected here, and what is left frozen while the workers fork, so that a worker never runs
        # a finalizer of the parent's objects: an ONNX Runtime session's waits for its thread pool, whose threads
        # a forked child does not have (a run of several jobs in one process hung exactly so).
        gc.collect()
        gc.freeze()
        try:
            self.pool.submit(len, [])  # starts every worker now (for "fork": before any other thread exists)
        finally:
            gc.unfreeze()

    def submit(self, processor: Processor, items: list) -> Future[list[Ready]]:
        return self.pool.submit(prepare_rows, processor, items)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def thread_pool(workers: int) -> ThreadPoolExecutor | None:
    return ThreadPoolExecutor(workers, thread_name_prefix="prepare") if workers > 1 else None
