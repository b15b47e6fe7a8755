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

import numpy as np
import pyarrow as pa

# NOTE: ray is an optional extra; this module is imported only for --engine ray. Ray Data turns its tensor
# column into one ndarray per batch (batch_format="numpy"): no per-row objects on either side.
from ray.data.extensions import ArrowTensorArray

from service.offline.readers import Item

PAYLOAD_KINDS = ("text", "bytes", "int", "array", "pickle")


def _kind(payloads: Sequence) -> str:
    """The narrowest column kind that holds every payload (items that failed to read carry None)."""
    present = [p for p in payloads if p is not None]
    if not present:
        return "pickle"
    if all(isinstance(p, str) for p in present):
        return "text"
    if all(isinstance(p, bytes) for p in present):
        return "bytes"
    if all(isinstance(p, int) and not isinstance(p, bool) for p in present):
        return "int"
    first = present[0]
    if (len(present) == len(payloads) and isinstance(first, np.ndarray) and first.dtype.kind in "biuf"
            and all(isinstance(p, np.ndarray) and p.shape == first.shape and p.dtype == first.dtype
                    for p in present)):
        return "array"
    return "pickle"


def to_block(items: Sequence[Item]) -> pa.Table:
    """One Arrow table for `items`, with the payload in the narrowest native column."""
    payloads = [None if it.error is not None else it.payload for it in items]
    kind = _kind(payloads)
    if kind == "array":
        column = ArrowTensorArray.from_numpy(np.stack([p for p in payloads if p is not None]))
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
