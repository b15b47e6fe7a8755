"""Whole windows read as arrays, for the jobs whose per-row preparation is trivial next to Python's cost per row.

- Parquet user ids (the recommender): the `user_id` (and `id`) columns of a window are read as Arrow arrays,
  run through the model a batch at a time straight from the int64 column, post-processed for the whole window
  at once (`RecommenderProcessor.columns_for`) and written to Parquet as columns: no Item, dict or prepared
  object per row.
- `.npy` images (cnn): a window's rows are one slice of the memory-mapped array, laid out (MNIST layout) a model
  batch at a time straight from that slice, in a thread one batch ahead of ONNX Runtime.

Each reader gives the windows (rows, ids, errors) the row-by-row reader gives (readers.py), so parts, ordering
and --resume are unchanged; an input that does not fit (other columns, other types, other array shapes) gives
None and goes the row-by-row way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.offline.arrow import parquet
from service.offline.prepare import Ready, error_message
from service.offline.readers import NO_FIELD_ERROR, TEXT_FIELDS, Item
from service.offline.rows import base_schema
from service.processing.image import PreparedImage, finite_rows, layout_batch, non_finite
from service.processing.recommender import UserColumns

# NOTE: pyarrow imports below are deferred: it is the optional `parquet` extra (.npy inputs need none of it).


@dataclass
class UserBlock:
    """A window of Parquet user-id rows: input rows, ids (Arrow strings), user ids (int64, 0 where missing)."""

    rows: np.ndarray
    ids: Any
    user_ids: np.ndarray
    missing: np.ndarray  # [rows] bool: the record has no user_id (an error row, as the row-by-row reader says)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class ImageBlock:
    """A window of `.npy` image rows: their Items (row, id; no payload) and their pixels, [rows, H, W] in [0, 1]."""

    items: list[Item]
    gray: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class UserSegment:
    """Output rows of a UserBlock: each row's error (None where it ran) and the results of those that ran."""

    block: UserBlock
    errors: list[str | None]
    results: UserColumns

    def __len__(self) -> int:
        return len(self.block)

    @property
    def failed(self) -> int:
        return sum(error is not None for error in self.errors)

    def dicts(self) -> list[dict]:
        results = iter(self.results.rows())
        return [{"row": row, "id": ident, "ok": error is None, "error": error,
                 "result": next(results) if error is None else None}
                for row, ident, error in zip(self.block.rows.tolist(), self.block.ids.to_pylist(), self.errors)]

    def table(self) -> Any:
        import pyarrow as pa

        ok = np.array([error is None for error in self.errors], bool)
        results = self.results.arrow()
        if not ok.all():  # each row's position among the results, null for a failed row: `take` gives it null
            results = results.take(pa.array(np.cumsum(ok) - 1, pa.int64(), mask=~ok))
        base = pa.Table.from_arrays([pa.array(self.block.rows, pa.int64()), self.block.ids, pa.array(ok),
                                     pa.array(self.errors, pa.string())], schema=base_schema())
        return base.append_column("result", results)


def parquet_user_blocks(path: Path, *, start: int, part_rows: int, limit: int | None) -> Iterator[UserBlock] | None:
    """Windows of `part_rows` rows from row `start` on (at most `limit` rows in all), or None when the file holds
    more than integer `user_id`s (and string or integer `id`s): those records go the row-by-row way."""
    pq = parquet(f"Parquet input {path}")
    import pyarrow as pa

    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if "user_id" not in schema.names or set(schema.names) & set(TEXT_FIELDS) - {"user_id"}:
        return None
    if not _exact_int(schema.field("user_id").type):
        return None
    has_id = "id" in schema.names
    if has_id and not (_exact_int(schema.field("id").type) or pa.types.is_string(schema.field("id").type)
                       or pa.types.is_large_string(schema.field("id").type)):
        return None  # str() of floats, bools, ... is Python's: leave those to the row-by-row reader
    columns = ["user_id", "id"] if has_id else ["user_id"]
    stop = pf.metadata.num_rows if limit is None else min(pf.metadata.num_rows, start + limit)

    def blocks() -> Iterator[UserBlock]:
        for first, table in _windows(pf.iter_batches(batch_size=part_rows, columns=columns), start=start,
                                     stop=stop, size=part_rows):
            yield _user_block(table, first=first, has_id=has_id)

    return blocks()


def _exact_int(kind: Any) -> bool:
    """An Arrow integer type whose every value is a Python int within int64 (what `prepare` accepts)."""
    import pyarrow as pa

    return pa.types.is_integer(kind) and kind != pa.uint64()


def _windows(batches: Iterator[Any], *, start: int, stop: int, size: int) -> Iterator[tuple[int, Any]]:
    """(first row, Arrow table) of rows [start, stop) in windows of `size` rows, whatever the batches' sizes."""
    import pyarrow as pa

    pending, row, first = [], 0, start
    for batch in batches:
        lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
        row += batch.num_rows
        if hi > lo:
            pending.append(batch.slice(lo, hi - lo))
        while sum(b.num_rows for b in pending) >= size:
            table = pa.Table.from_batches(pending)
            yield first, table.slice(0, size)
            pending, first = table.slice(size).to_batches(), first + size
        if row >= stop:
            break
    if pending and sum(b.num_rows for b in pending):
        yield first, pa.Table.from_batches(pending)


def _user_block(table: Any, *, first: int, has_id: bool) -> UserBlock:
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = np.arange(first, first + table.num_rows, dtype=np.int64)
    users = table.column("user_id")
    row_ids = pc.cast(pa.array(rows), pa.string())
    ids = pc.if_else(pc.is_null(table.column("id")), row_ids, pc.cast(table.column("id"), pa.string())) \
        if has_id else row_ids
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    missing = pc.is_null(users).to_numpy(zero_copy_only=False)
    user_ids = pc.fill_null(users, 0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return UserBlock(rows, ids.cast(pa.string()), user_ids, missing)


def run_user_block(model: Any, block: UserBlock, *, params: dict, batch_size: int) -> UserSegment | list[dict]:
    """A window's rows through the model in batches of `batch_size` window rows (as the row-by-row engine
    batches them), post-processed all at once; a batch the runtime fails records its error on its own rows."""
    processor, names = model.processor, model.output_names
    errors: list[str | None] = [NO_FIELD_ERROR if m else None for m in block.missing.tolist()]
    ran, outputs = [], []
    for s in range(0, len(block), batch_size):
        todo = np.flatnonzero(~block.missing[s:s + batch_size]) + s
        if not len(todo):
            continue
        try:
            outputs.append(model.session.run(names, processor.collate_ids(block.user_ids[todo])))
            ran.append(todo)
        except Exception as exc:  # the whole batch failed in the runtime: record it on each of its rows
            message = getattr(exc, "message", f"{type(exc).__name__}: {exc}")
            for i in todo.tolist():
                errors[i] = message
    if not ran:  # no row ran: as the row-by-row engine, plain rows (no result type to give the part)
        return [{"row": row, "id": ident, "ok": False, "error": error, "result": None}
                for row, ident, error in zip(block.rows.tolist(), block.ids.to_pylist(), errors)]
    good = np.concatenate(ran)
    joined = {name: np.concatenate([np.asarray(out[j]) for out in outputs])
              for j, name in enumerate(names)}
    return UserSegment(block, errors, processor.columns_for(joined, block.user_ids[good], params=params))


def npy_image_blocks(path: Path, *, start: int, part_rows: int, limit: int | None) -> Iterator[ImageBlock] | None:
    """Windows of `part_rows` rows of a `.npy` of [H, W] (or [1, H, W], ...) numeric images, or None when its rows
    are not 2-D images once squeezed (the row-by-row reader says so for each row)."""
    arr = np.load(path, mmap_mode="r")
    shape = [d for d in arr.shape[1:] if d != 1]
    if arr.ndim < 2 or len(shape) != 2 or arr.dtype.kind not in "uif":
        return None
    stop = arr.shape[0] if limit is None else min(arr.shape[0], start + limit)

    def blocks() -> Iterator[ImageBlock]:
        for first in range(start, stop, part_rows):
            last = min(first + part_rows, stop)
            # One read of the window into one float32 array, as `ImageProcessor._gray` converts each row.
            gray = np.asarray(arr[first:last], np.float32).reshape(last - first, *shape)
            yield ImageBlock([Item(row, str(row)) for row in range(first, last)],
                             gray / 255.0 if arr.dtype == np.uint8 else gray)

    return blocks()


def prepare_images(gray: np.ndarray, *, rows: list[int]) -> list[Ready]:
    """`ImageProcessor.prepare_batch` of equally sized [N, H, W] grayscale rows (their input `rows`), from the
    array itself: each row's (prepared, None), or (None, error) for a row holding NaN or infinity."""
    finite = finite_rows(gray)
    size = (gray.shape[2], gray.shape[1])
    out: list[Ready] = [(None, error_message(non_finite(row))) for row in rows]
    good = np.flatnonzero(finite).tolist()
    if good:
        pixels, inverted = layout_batch(gray if len(good) == len(gray) else gray[good])
        for pos, px, inv in zip(good, pixels, inverted.tolist()):
            out[pos] = (PreparedImage(px, size, inv), None)
    return out
