"""Running a model over items in-process: one ONNX Runtime session, the task processors' pre/post-processing."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.errors import ServingError
from service.modelrepo.config import DEFAULT_MAX_BATCH_SIZE, ModelSpec, completed_spec, graph_tensors, read_config
from service.modelrepo.layout import DEFAULT_MODEL_FILENAME, latest_version, model_file
from service.modelrepo.sessions import choose_providers, create_session
from service.processing.base import Processor
from service.processing.registry import build_processor


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


def _prepare_one(model: LoadedModel, item) -> tuple[object, str | None]:
    if item.error is not None:
        return None, item.error
    try:
        return model.processor.prepare(item.payload, index=item.row), None
    except ServingError as exc:
        return None, exc.message
    except Exception as exc:  # an unexpected failure on one row is still only that row's
        return None, f"{type(exc).__name__}: {exc}"


def _prepare_all(model: LoadedModel, items: list, *, pool: ThreadPoolExecutor | None, workers: int) -> list:
    """Prepare in a few contiguous slices (one task per worker), so cheap rows do not pay a task each."""
    if pool is None or workers < 2 or len(items) < 2:
        return [_prepare_one(model, it) for it in items]
    n = workers
    step = -(-len(items) // n)
    slices = pool.map(lambda s: [_prepare_one(model, it) for it in items[s:s + step]], range(0, len(items), step))
    return [r for part in slices for r in part]


def predict_items(model: LoadedModel, items: list, *, params: dict, pool: ThreadPoolExecutor | None = None,
                  workers: int = 1) -> list[dict]:
    """Output rows for `items` in order, as one batch in input order; a bad item becomes an error row and never
    stops the batch. `pool` prepares items in threads (decoding and resizing release the GIL)."""
    return predict_window(model, items, params=params, batch_size=max(len(items), 1), pool=pool, workers=workers,
                          by_length=False)


def inline_prepare(model: LoadedModel, items: list) -> bool:
    """True where preparing a row is trivial (a user id, an in-memory .npy row): a thread pool around it costs
    more in task hand-offs than the work itself."""
    return model.processor.task == "recommendation" or any(isinstance(it.payload, np.ndarray) for it in items[:1])


def length_order(prepared: list) -> list[int]:
    """Positions of `prepared` shortest first when rows are token sequences (text), else as they are.

    A batch pads to its longest row, so batching texts of like length cuts the padded work; the sort is stable
    so equal lengths keep input order, and callers put every result back at its own row.
    """
    if prepared and all(hasattr(p, "ids") for p in prepared):
        return sorted(range(len(prepared)), key=lambda i: len(prepared[i].ids))
    return list(range(len(prepared)))


def predict_window(model: LoadedModel, items: list, *, params: dict, batch_size: int,
                   pool: ThreadPoolExecutor | None = None, workers: int = 1, by_length: bool = True) -> list[dict]:
    """Output rows for a whole window (one output part) in input order: every row prepared first, text rows
    batched by token length (unless `by_length` is off), each batch's rows written back to their own positions."""
    if inline_prepare(model, items):
        pool = None
    rows: list[dict | None] = [None] * len(items)
    good, prepared = [], []
    for i, (item, (ready, error)) in enumerate(zip(items, _prepare_all(model, items, pool=pool, workers=workers))):
        if error is not None:
            rows[i] = error_row(item, error)
        else:
            prepared.append(ready)
            good.append(i)
    order = length_order(prepared) if by_length else list(range(len(prepared)))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for j, row in zip(batch, _run_batch(model, [prepared[j] for j in batch],
                                            [items[good[j]] for j in batch], params=params)):
            rows[good[j]] = row
    return [r for r in rows if r is not None]


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


class LocalEngine:
    """In-process: one session; each window prepared whole, then run in batches of `batch_size` rows."""

    def __init__(self, model_dir: Path, *, batch_size: int, params: dict, workers: int = 2) -> None:
        self.model = load_model(model_dir)
        self.batch_size, self.params = batch_size, params
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare") if workers > 1 else None

    @property
    def task(self) -> str:
        return self.model.processor.task

    def predict(self, items: list) -> list[dict]:
        # Text is prepared a whole part at a time so it can be batched by length; other rows (decoded images,
        # waveforms) a batch at a time, so a part's decoded arrays are never all in memory at once.
        step = len(items) if self.model.processor.task.startswith("text-") else self.batch_size
        out: list[dict] = []
        for start in range(0, len(items), max(step, 1)):
            out += predict_window(self.model, items[start:start + step], params=self.params,
                                  batch_size=self.batch_size, pool=self.pool, workers=self.workers)
        return out

    def predict_windows(self, windows: Iterable[list]) -> Iterator[list[dict]]:
        for window in windows:
            yield self.predict(window)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
