"""Preparing rows for the model (decode, lay out, tokenise): where and how, so the model never waits on it.

- Files to decode (PNG/JPEG, WAV) go to a process pool sized to the cores, a model batch per task, submitted a
  window ahead: decoding and the per-image numpy work hold the GIL, so threads would not overlap them.
- Trivial rows (user ids, in-memory .npy rows) are prepared inline: a pool's hand-offs cost more than the work.
- Text is tokenised in a few thread slices (the tokenizer releases the GIL), a whole window at a time.
A processor with `prepare_batch` (images) prepares a batch with one array op per step instead of one per row.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from service.errors import ServingError
from service.processing.base import Processor

# (prepared, None) for a row that is ready, (None, why) for one that is not.
Ready = tuple[Any, str | None]

_WORKER_PROCESSOR: Processor | None = None  # the processor, in each decode worker process


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


def _init_worker(processor: Processor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor


def _prepare_in_worker(items: list) -> list[Ready]:
    assert _WORKER_PROCESSOR is not None, "decode worker started without its processor"
    return prepare_rows(_WORKER_PROCESSOR, items)


class DecodePool:
    """Worker processes that prepare file rows, each holding a copy of the model's processor.

    NOTE: "forkserver", not "fork": the engine's process runs ONNX Runtime's and the writer's threads, and forking
    a threaded process can deadlock the child; the server process preloads the processing modules once, so a
    worker starts in milliseconds after the first.
    """

    def __init__(self, processor: Processor, *, workers: int) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["service.offline.prepare", "service.processing.registry"])
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                        initargs=(processor,))
        self.warm = self.pool.submit(_prepare_in_worker, [])  # start the workers now, while the model loads

    def submit(self, items: list) -> Future[list[Ready]]:
        return self.pool.submit(_prepare_in_worker, items)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def thread_pool(workers: int) -> ThreadPoolExecutor | None:
    return ThreadPoolExecutor(workers, thread_name_prefix="prepare") if workers > 1 else None
