"""What every task processor provides, so HTTP endpoints and batch jobs share one implementation."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, Self

import numpy as np

from service.errors import InvalidInput


@dataclass(frozen=True)
class Limits:
    """Per-item and per-request bounds the processors enforce; the server fills them from ServerSettings.

    Each message names the setting (`setting` below) so an operator knows what to raise.
    """

    max_text_bytes: int = 64 * 1024
    max_image_pixels: int = 16_000_000
    max_request_pixels: int = 64_000_000
    min_sample_rate: int = 8_000
    max_sample_rate: int = 192_000
    max_audio_seconds: float = 60.0
    max_request_audio_seconds: float = 600.0
    max_batch_tokens: int = 4096

    @classmethod
    def from_settings(cls, settings: object) -> Limits:
        """The limits out of a ServerSettings (anything with these attribute names)."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


def setting(name: str) -> str:
    """How an error message names a limit: the setting and its environment variable."""
    return f"setting {name} (MODELSERVE_{name.upper()})"


class Processor(Protocol):
    """Pre/post-processing of one model.

    `prepare` turns one raw item (upload bytes, text, user id, array) into model-ready data and raises a
    typed ServingError for a bad item; `collate` stacks prepared items into the model's input tensors (equal
    shapes, so the dynamic batcher can stack requests); `postprocess` turns output rows into JSON-able dicts.
    """

    task: str

    def describe(self) -> dict: ...

    def admit(self, payloads: Sequence[Any]) -> None:
        """Check the request's total budget (pixels, seconds) from headers only, before any item is decoded."""

    def prepare(self, payload: Any, *, index: int) -> Any: ...

    def rows_per_run(self, prepared: Sequence[Any]) -> int | None:
        """At most this many prepared items in one model run (None: the model's max_batch_size decides)."""

    def collate(self, prepared: list[Any]) -> dict[str, np.ndarray]: ...

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: list[Any], *, params: dict) -> list[dict]: ...


def b64decode(value: object, *, index: int, what: str) -> bytes:
    """Base64 (standard or URL-safe, with or without a data: URL prefix) -> bytes; 400 naming the index."""
    if isinstance(value, dict) and "b64" in value:  # KServe V1's {"b64": "..."} convention
        value = value["b64"]
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else type(value).__name__
        raise InvalidInput(f"item {index}: expected a base64 string of a {what}, got {got}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"item {index}: not valid base64 (expected a base64-encoded {what})") from None


def top_k(probs: np.ndarray, *, labels: list[str] | None, k: int) -> list[dict]:
    """Best k classes of one probability row, best first."""
    k = max(1, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i] if labels and i < len(labels) else str(int(i)), "index": int(i),
             "probability": float(probs[i])} for i in order]


def top_k_rows(probs: np.ndarray, *, labels: list[str] | None, k: int) -> list[list[dict]]:
    """`top_k` of every row of a [batch, classes] array at once, each row's list identical to `top_k`'s.

    argpartition finds each row's k best in O(classes); only those k are sorted. A row whose k-th best value is
    tied with one left outside falls back to `top_k`, whose stable sort breaks ties by the lower index.
    """
    rows, classes = probs.shape
    k = max(1, min(int(k), classes))
    if rows == 0:
        return []
    if k < classes:
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(classes), (rows, classes))
    vals = np.take_along_axis(probs, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # best first, ties by index, as the stable argsort
    idx, vals = np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)
    tied = (probs >= vals[:, -1:]).sum(axis=1) > k
    names = [labels[i] if labels and i < len(labels) else str(i) for i in range(classes)]
    idx_l, vals_l = idx.tolist(), vals.tolist()
    return [top_k(probs[r], labels=labels, k=k) if tied[r] else
            [{"label": names[i], "index": i, "probability": v} for i, v in zip(idx_l[r], vals_l[r])]
            for r in range(rows)]


def class_names(labels: list[str] | None, classes: int) -> list[str]:
    """Each class index's label, as `top_k` names it (the index itself past the labels' end)."""
    return [labels[i] if labels and i < len(labels) else str(i) for i in range(classes)]


def top_k_columns(probs: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` of every row of a [rows, classes] array as two [rows, k] columns: class indices (int64, best first,
    ties by the lower index: `top_k`'s stable sort of each row) and their values (float64, the same floats)."""
    k = max(1, min(int(k), probs.shape[1]))
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return best.astype(np.int64), np.take_along_axis(probs, best, axis=1).astype(np.float64)


@dataclass
class TopKColumns:
    """A batch's classification results as columns: each row's k best classes, best first. Families add their
    per-row facts as further list (or [rows, ...] array) fields; `concat` joins them all."""

    names: list[str]  # label of each class index
    index: np.ndarray  # [rows, k] int64
    probability: np.ndarray  # [rows, k] float64 (the model's float32 values, exactly)

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def concat(cls, parts: list[Self]) -> Self | None:
        """The parts' rows one after another, or None when they differ in labels or k (they cannot share columns)."""
        first = parts[0]
        if any(p.names != first.names or p.index.shape[1] != first.index.shape[1] for p in parts):
            return None
        joined: dict[str, Any] = {"names": first.names}
        for f in fields(cls):
            if f.name != "names":
                values = [getattr(p, f.name) for p in parts]
                joined[f.name] = (np.concatenate(values) if isinstance(values[0], np.ndarray)
                                  else [v for part in values for v in part])
        return cls(**joined)


def predictions_arrow(names: list[str], index: np.ndarray, probability: np.ndarray) -> Any:
    """[rows, k] top-k columns as the Arrow list column Arrow infers from `top_k`'s dicts ({label, index,
    probability} structs), without a dict per row."""
    # NOTE: pyarrow is the optional `parquet` extra; only the batch Parquet writer calls this.
    import pyarrow as pa

    rows, k = index.shape
    flat = pa.array(index.ravel())
    picks = pa.StructArray.from_arrays([pa.array(names, pa.string()).take(flat), flat,
                                        pa.array(probability.ravel())], names=["label", "index", "probability"])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32)), picks)


def parse_k(value: object, *, default: int, limit: int) -> int:
    if value is None:
        return default
    try:
        k = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise InvalidInput(f"'k' must be a positive integer, got {value!r}") from None
    if not 1 <= k <= limit:
        raise InvalidInput(f"'k' must be between 1 and {limit}, got {k}")
    return k
