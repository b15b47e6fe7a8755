"""Items <-> Arrow blocks for the Ray engine: native columns, so neither side pickles an object per row.

A block has `row` (int64), `id` (string), `error` (string, null when the item was read) and ONE payload column
whose name says its kind: `text` (string), `bytes` (binary: image or WAV files), `int` (user ids), `array` (a
tensor column of equally shaped rows, from a .npy) or, for anything else (a JSONL `text` that is not a string, a
block mixing kinds), `pickle` (one pickled payload per row, the old layout). Each block is one actor call, so
blocks of different kinds never need to share a schema.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# NOTE: ray is an optional extra; this module is imported only for --engine ray. Ray Data turns its tensor
# column into one ndarray per batch (batch_format="numpy"): no per-row objects on either side.
from ray.data.extensions import ArrowTensorArray

from service.offline.readers import Item

PAYLOAD_KINDS = ("text", "bytes", "int", "array", "pickle")


def _kind(values: Sequence) -> str:
    """The narrowest column kind that holds the payloads of every item that was read."""
    if not values:
        return "pickle"
    for kind, cls in (("text", str), ("bytes", bytes)):  # nullable columns: a JSONL `text` may be null
        if all(v is None or isinstance(v, cls) for v in values) and any(v is not None for v in values):
            return kind
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    first = values[0]
    if (isinstance(first, np.ndarray) and first.dtype.kind in "biuf"
            and all(isinstance(v, np.ndarray) and v.shape == first.shape and v.dtype == first.dtype
                    for v in values)):
        return "array"
    return "pickle"


def to_block(items: Sequence[Item]) -> pa.Table:
    """One Arrow table for `items`, with the payload in the narrowest native column."""
    kind = _kind([it.payload for it in items if it.error is None])
    read = next((it.payload for it in items if it.error is None), None)
    # Rows that failed to read carry a filler in int and tensor columns (those must not hold nulls: Ray Data
    # would turn an int column with nulls into floats); their error column says the payload is not there.
    filler = {"int": 0, "array": np.zeros_like(read) if kind == "array" else None}.get(kind)
    payloads: list[Any] = [filler if it.error is not None else it.payload for it in items]
    if kind == "array":
        column = ArrowTensorArray.from_numpy(np.stack(payloads))
    elif kind == "pickle":
        column = pa.array([pickle.dumps(p) for p in payloads], pa.binary())
    else:
        column = pa.array(payloads, {"text": pa.string(), "bytes": pa.binary(), "int": pa.int64()}[kind])
    return pa.table({"row": pa.array([it.row for it in items], pa.int64()),
                     "id": pa.array([it.id for it in items], pa.string()),
                     "error": pa.array([it.error for it in items], pa.string()),
                     kind: column})


def from_columns(batch: dict[str, np.ndarray]) -> list[Item]:
    """The Items of one block as Ray Data hands it to an actor (batch_format="numpy")."""
    kind = next(k for k in PAYLOAD_KINDS if k in batch)
    column = batch[kind]
    if kind == "array":
        payloads: list = list(column)  # row views of the batch's one ndarray
    elif kind == "pickle":
        payloads = [pickle.loads(blob) for blob in column]
    else:
        payloads = column.tolist()  # str/bytes/int objects, as the readers yield them
    return [Item(int(row), str(ident), None if error is not None else payload, error)
            for row, ident, error, payload in zip(batch["row"].tolist(), batch["id"].tolist(),
                                                  batch["error"].tolist(), payloads)]
