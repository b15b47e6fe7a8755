"""Running a model over items in-process: one ONNX Runtime session, the task processors' pre/post-processing.

The local engine is a pipeline: while one window's batches run on ONNX Runtime, the next window's file rows are
decoded in worker processes (service/offline/prepare.py), and the caller writes finished windows in the
background (writers.BackgroundWriter), so decoding, compute and writing overlap with bounded memory: at most
two windows are in flight. A job that is one window is written by the caller when it is done (writers.OnePart).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.modelrepo.config import DEFAULT_MAX_BATCH_SIZE, ModelSpec, completed_spec, graph_tensors, read_config
from service.modelrepo.layout import DEFAULT_MODEL_FILENAME, latest_version, model_file
from service.modelrepo.sessions import choose_providers, create_session
from service.offline.columnar import (
    ImageBlock,
    UserBlock,
    npy_image_blocks,
    parquet_user_blocks,
    prepare_images,
    run_user_block,
)
from service.offline.prepare import (
    DecodePool,
    Ready,
    decodes_files,
    prepare_rows,
    prepare_slices,
    prepares_inline,
    thread_pool,
)
from service.offline.rows import ColumnSegment, Rows
from service.processing.base import Processor
from service.processing.registry import build_processor
from service.runtime import synthetic_inputs


@dataclass
class LoadedModel:
    spec: ModelSpec
    processor: Processor
    session: ort.InferenceSession
    output_names: list[str]


def load_model(model_dir: Path, *, threads: int = 0) -> LoadedModel:
    """Spec (config.pbtxt completed from the graph, as the server does), processor and one session on the
    latest version (GPU providers first when this onnxruntime build has them)."""
    read = read_config(model_dir)
    filename = read[0].default_model_filename or DEFAULT_MODEL_FILENAME
    path = model_file(model_dir, latest_version(model_dir), filename)
    session = create_session(path, providers=choose_providers(), threads=threads)
    graph_inputs, graph_outputs = graph_tensors(session)
    spec = completed_spec(model_dir, name=model_dir.name, read=read, graph_inputs=graph_inputs,
                          graph_outputs=graph_outputs, default_max_batch_size=DEFAULT_MAX_BATCH_SIZE)
    processor = build_processor(spec, model_dir=model_dir)
    return LoadedModel(spec, processor, session, [o.name for o in spec.outputs])


def error_row(item, message: str) -> dict:
    return {"row": item.row, "id": item.id, "ok": False, "error": message, "result": None}


def length_order(prepared: list) -> list[int]:
    """Positions of `prepared` shortest first when rows are token sequences (text), else as they are.

    A batch pads to its longest row, so batching texts of like length cuts the padded work; the sort is stable
    so equal lengths keep input order, and callers put every result back at its own row.
    """
    if prepared and all(hasattr(p, "ids") for p in prepared):
        return sorted(range(len(prepared)), key=lambda i: len(prepared[i].ids))
    return list(range(len(prepared)))


def run_prepared(model: LoadedModel, items: list, ready: list[Ready], *, params: dict, batch_size: int,
                 by_length: bool = True) -> list[dict]:
    """Output rows for `items` (prepared as `ready`) in input order: rows that failed to prepare become error
    rows, the rest run in batches of `batch_size` (text by token length unless `by_length` is off), each
    batch's rows written back to their own positions."""
    rows: list[dict | None] = [None] * len(items)
    good, prepared = [], []
    for i, (item, (value, error)) in enumerate(zip(items, ready, strict=True)):
        if error is not None:
            rows[i] = error_row(item, error)
        else:
            prepared.append(value)
            good.append(i)
    order = length_order(prepared) if by_length else list(range(len(prepared)))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for j, row in zip(batch, _run_batch(model, [prepared[j] for j in batch],
                                            [items[good[j]] for j in batch], params=params)):
            rows[good[j]] = row
    return [r for r in rows if r is not None]


def predict_items(model: LoadedModel, items: list, *, params: dict) -> list[dict]:
    """Output rows for `items` in order, as one batch in input order; a bad item becomes an error row and never
    stops the batch."""
    return run_prepared(model, items, prepare_rows(model.processor, items), params=params,
                        batch_size=max(len(items), 1), by_length=False)


def predict_window(model: LoadedModel, items: list, *, params: dict, batch_size: int,
                   pool: Executor | None = None, workers: int = 1) -> list[dict]:
    """Output rows for a whole window (one output part) in input order, every row prepared first (in `pool`'s
    threads when given), text batched by token length."""
    ready = prepare_slices(model.processor, items, pool=pool, workers=workers)
    return run_prepared(model, items, ready, params=params, batch_size=batch_size)


def _run_batch(model: LoadedModel, prepared: list, items: list, *, params: dict) -> list[dict]:
    try:
        feeds = model.processor.collate(prepared)
        arrays = model.session.run(model.output_names, feeds)
        outputs = dict(zip(model.output_names, (np.asarray(a) for a in arrays)))
        results = model.processor.postprocess(outputs, prepared, params=params)
        return [{"row": it.row, "id": it.id, "ok": True, "error": None, "result": result}
                for it, result in zip(items, results, strict=True)]
    except Exception as exc:  # the whole batch failed in the runtime: record it on each row
        message = getattr(exc, "message", f"{type(exc).__name__}: {exc}")
        return [error_row(it, message) for it in items]


def run_segment(model: LoadedModel, items: list, ready: list[Ready], *, params: dict) -> list[dict] | ColumnSegment:
    """One model batch of `items` in input order: as result columns where the processor gives them
    (`postprocess_columns`), else as row dicts."""
    columns = getattr(model.processor, "postprocess_columns", None)
    good = [i for i, (_, error) in enumerate(ready) if error is None]
    if columns is None or not good:
        return run_prepared(model, items, ready, params=params, batch_size=max(len(items), 1), by_length=False)
    prepared = [ready[i][0] for i in good]
    try:
        arrays = model.session.run(model.output_names, model.processor.collate(prepared))
        results = columns(dict(zip(model.output_names, (np.asarray(a) for a in arrays))), prepared, params=params)
    except Exception as exc:  # the whole batch failed in the runtime: record it on each row
        message = getattr(exc, "message", f"{type(exc).__name__}: {exc}")
        return [error_row(it, error or message) for it, (_, error) in zip(items, ready)]
    return ColumnSegment(items, [error for _, error in ready], results)


# Rows of a `.npy` window laid out at once (see LocalEngine._lay_out).
LAYOUT_ROWS = 256


class Waiting(Protocol):
    def result(self) -> list[Ready]: ...


@dataclass
class RowsOf:
    """Rows [start, stop) of a future's prepared rows: a model batch of a chunk laid out at once."""

    chunk: Future[list[Ready]]
    start: int
    stop: int

    def result(self) -> list[Ready]:
        return self.chunk.result()[self.start:self.stop]


# A window in flight: its items and, per model batch, its prepared rows to wait for (None: prepare inline).
Pending = tuple[list | UserBlock | ImageBlock, list[tuple[list, Waiting | None]]]


class LocalEngine:
    """In-process: one session; image files decoded a window ahead in worker processes, text tokenised a window
    at a time in threads (and batched by length), trivial rows and WAVs (`prepares_inline`) prepared inline a
    batch at a time."""

    def __init__(self, model_dir: Path, *, batch_size: int, params: dict, workers: int = 2,
                 decode_files: bool | None = None) -> None:
        # The decode workers first, while the process has no other thread (see DecodePool), when the caller
        # knows the input holds files; otherwise on the first window that does.
        self.decoder = DecodePool(workers=workers) if decode_files and workers > 1 else None
        try:
            self.model = load_model(model_dir)
        except BaseException:
            self.close()
            raise
        self.batch_size, self.params = batch_size, params
        self.workers = workers
        self.text = self.model.processor.task.startswith("text-")
        # Files this processor prepares cheaper than any hand-off (WAVs) are prepared inline, as trivial rows.
        self.inline_files = not self.text and prepares_inline(self.model.processor)
        if self.inline_files and self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        self.threads = thread_pool(workers) if self.text else None
        self.ahead: ThreadPoolExecutor | None = None  # lays out .npy image batches one ahead of the model
        self._warm_up()

    def _warm_up(self) -> None:
        """One run of zeros at the job's batch size before any row, as the server warms a model when it loads
        it: ONNX Runtime's first run sets up its memory (~5 ms on the recommender, 2.5 µs per row of a 2000-row
        job). A model that cannot run zeros is warmed by its first batch instead."""
        spec = self.model.spec
        feeds = synthetic_inputs(graph_tensors(self.model.session)[0], batch_size=self.batch_size,
                                 batched=spec.max_batch_size > 0)
        try:
            self.model.session.run(self.model.output_names, feeds)
        except Exception:  # NOTE: zeros may be outside a model's domain; the job itself reports real failures
            return

    @property
    def task(self) -> str:
        return self.model.processor.task

    def predict(self, items: list) -> list[dict]:
        return self._finish(self._start(items)).dicts()

    def predict_windows(self, windows: Iterable[list]) -> Iterator[Rows]:
        """Rows of each window in order; the next window's files are being decoded while this one runs."""
        pending: deque[Pending] = deque()
        for window in windows:
            pending.append(self._start(window))
            if len(pending) > 1:
                yield self._finish(pending.popleft())
        while pending:
            yield self._finish(pending.popleft())

    def blocks(self, path: Path, *, start: int, part_rows: int, limit: int | None) -> Iterator | None:
        """The input's windows read as arrays (service/offline/columnar.py) where this model and input allow it,
        else None (the caller reads Items)."""
        suffix = path.suffix.lower() if path.is_file() else ""
        if suffix == ".parquet" and hasattr(self.model.processor, "columns_for"):
            return parquet_user_blocks(path, start=start, part_rows=part_rows, limit=limit)
        if suffix == ".npy" and self.task == "image-classification":
            return npy_image_blocks(path, start=start, part_rows=part_rows, limit=limit)
        return None

    def _start(self, window: list | UserBlock | ImageBlock) -> Pending:
        if isinstance(window, UserBlock):
            return window, []
        if isinstance(window, ImageBlock):
            return window, self._lay_out(window)
        if self.text:
            return window, [(window, None)]
        batches = [window[s:s + self.batch_size] for s in range(0, len(window), self.batch_size)]
        if self.decoder is None and self.workers > 1 and not self.inline_files and decodes_files(window):
            self.decoder = DecodePool(workers=self.workers)
        if self.decoder is None or not decodes_files(window):
            return window, [(batch, None) for batch in batches]
        return window, [(batch, self.decoder.submit(self.model.processor, batch)) for batch in batches]

    def _lay_out(self, block: ImageBlock) -> list[tuple[list, Waiting | None]]:
        """The block laid out in a thread, in order, ahead of the model: the first model batch alone (the model
        starts at once), then chunks of about LAYOUT_ROWS rows, each model batch taking its rows of its chunk.

        NOTE: the layout is per image, so a chunk gives each row the bits a batch alone gives; its ~100 numpy
        calls cost the same per call whatever the rows, so 256 rows at once cost ~25 % less CPU per row than 32.
        """
        if self.ahead is None:
            self.ahead = ThreadPoolExecutor(1, thread_name_prefix="layout")
        ahead, size = self.ahead, self.batch_size
        chunk = max(size, LAYOUT_ROWS // size * size)
        batches: list[tuple[list, Waiting | None]] = []
        starts = [0, *range(size, len(block), chunk)] if len(block) > size else [0]
        for lo, hi in zip(starts, [*starts[1:], len(block)]):
            items = block.items[lo:hi]
            laid = ahead.submit(prepare_images, block.gray[lo:hi], rows=[item.row for item in items])
            batches += [(items[s:s + size], RowsOf(laid, s, s + size)) for s in range(0, hi - lo, size)]
        return batches

    def _finish(self, pending: Pending) -> Rows:
        window, batches = pending
        if isinstance(window, UserBlock):
            return Rows([run_user_block(self.model, window, params=self.params, batch_size=self.batch_size)])
        if self.text and isinstance(window, list):  # a whole window tokenised, then batched by length
            return Rows([predict_window(self.model, window, params=self.params, batch_size=self.batch_size,
                                        pool=self.threads, workers=self.workers)])
        segments = []
        for batch, future in batches:
            ready = future.result() if future is not None else prepare_rows(self.model.processor, batch)
            segments.append(run_segment(self.model, batch, ready, params=self.params))
        return Rows(segments)

    def close(self) -> None:
        if getattr(self, "threads", None) is not None:
            self.threads.shutdown()  # type: ignore[union-attr]
        if self.decoder is not None:
            self.decoder.close()
        if getattr(self, "ahead", None) is not None:
            self.ahead.shutdown(cancel_futures=True)  # type: ignore[union-attr]
