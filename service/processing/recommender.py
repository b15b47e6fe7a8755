"""Recommender: a user id -> the model's top items with scores.

The graph returns its top 50 per user and already answers an unknown id with the most popular items
(item_popularity.json order). We say which case applies: a user absent from seen_items.json (the training
interactions) is flagged `"fallback": "popular"`. `exclude_seen` drops items the user interacted with in
training; since filtering happens after the graph's top 50, fewer than k items may remain (`"returned"`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.errors import InvalidInput
from service.processing.base import Limits

ACCEPTS = "JSON {\"user_id\": int, \"k\": 10, \"exclude_seen\": true} (or {\"user_ids\": [...]})"
INT64_MAX = 2**63 - 1


@dataclass
class PreparedUser:
    user_id: int
    known: bool


class RecommenderProcessor:
    task = "recommendation"

    def __init__(self, *, model_dir: Path, input_name: str, item_output: str, score_output: str,
                 top_k: int, limits: Limits | None = None) -> None:
        # NOTE: `limits` keeps every processor's constructor alike; a user id needs no bound of its own
        # beyond the request's item count, which the core checks.
        del limits
        seen_path = model_dir / "seen_items.json"
        # orjson: a third of json's time on the zoo's 3,000 users (this file is most of a batch job's start-up).
        self._raw_seen: dict = orjson.loads(seen_path.read_bytes()) if seen_path.is_file() else {}
        self._seen_keys, self._users, self._stride = _seen_keys(self._raw_seen)
        self._user_ids = np.array(sorted(self._users), np.int64)  # for the positions of a whole column of ids
        self._user_pos = np.array([self._users[u] for u in self._user_ids.tolist()], np.int64)
        self._seen_bits = _seen_bits(self._seen_keys, size=len(self._users) * self._stride)
        self.input_name, self.item_output, self.score_output = input_name, item_output, score_output
        self.top_k = top_k

    @cached_property
    def seen(self) -> dict[int, set[int]]:
        """Each training user's seen items, built when first asked for (requests and jobs use the sorted keys)."""
        return {int(u): set(items) for u, items in self._raw_seen.items()}

    def describe(self) -> dict:
        return {"accepts": ACCEPTS,
                "preprocessing": "user ids as in the training data; unknown users get the most popular items, "
                                 "flagged \"fallback\": \"popular\"",
                "params": {"k": f"items returned, 1..{self.top_k} (default 10)",
                           "exclude_seen": "drop items the user interacted with in training (default true)"}}

    def admit(self, payloads: Sequence[Any]) -> None:
        """A user id costs the same whatever it is: the item count bounds the request."""

    def prepare(self, payload: Any, *, index: int) -> PreparedUser:
        if isinstance(payload, dict):
            payload = payload.get("user_id")
        if isinstance(payload, np.generic):
            payload = payload.item()
        if isinstance(payload, str) and payload.strip().lstrip("-").isdigit():
            payload = int(payload)
        if isinstance(payload, bool) or not isinstance(payload, int) or abs(payload) > INT64_MAX:
            raise InvalidInput(f"user {index}: expected an integer user_id, got {payload!r}")
        return PreparedUser(payload, payload in self._users)

    def rows_per_run(self, prepared: Sequence[Any]) -> int | None:
        return None

    def collate(self, prepared: list[PreparedUser]) -> dict[str, np.ndarray]:
        return {self.input_name: np.array([[p.user_id] for p in prepared], np.int64)}

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: list[PreparedUser], *,
                    params: dict) -> list[dict]:
        return self.postprocess_columns(outputs, prepared, params=params).rows()

    def postprocess_columns(self, outputs: dict[str, np.ndarray], prepared: list[PreparedUser], *,
                            params: dict) -> UserColumns:
        """`postprocess`'s results as columns (batch jobs write them without a dict per row)."""
        return self.columns_for(outputs, np.array([p.user_id for p in prepared], np.int64), params=params)

    def collate_ids(self, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """`collate` of a column of int64 user ids (batch jobs read them as one array, no PreparedUser each)."""
        return {self.input_name: user_ids.astype(np.int64, copy=False).reshape(-1, 1)}

    def columns_for(self, outputs: dict[str, np.ndarray], user_ids: np.ndarray, *, params: dict) -> UserColumns:
        """`postprocess_columns` of a column of int64 user ids (whatever number of model runs made `outputs`)."""
        k = _int_param(params.get("k"), default=10, limit=self.top_k)
        exclude = _bool_param(params.get("exclude_seen"), default=True)
        items = outputs[self.item_output][:len(user_ids)]
        users = self._positions(user_ids)
        keep = self._kept(items, users, k=k, exclude=exclude)
        return UserColumns(user_ids=user_ids.astype(np.int64, copy=False), known=users >= 0,
                           item_ids=items[keep].astype(np.int64),
                           scores=outputs[self.score_output][:len(user_ids)][keep].astype(np.float64),
                           returned=keep.sum(axis=1).astype(np.int64))

    def _positions(self, user_ids: np.ndarray) -> np.ndarray:
        """Each user's position among the training users (its key prefix), -1 for a user not among them."""
        if not len(self._user_ids):
            return np.full(len(user_ids), -1, np.int64)
        at = np.minimum(np.searchsorted(self._user_ids, user_ids), len(self._user_ids) - 1)
        return np.where(self._user_ids[at] == user_ids, self._user_pos[at], -1)

    def _kept(self, items: np.ndarray, users: np.ndarray, *, k: int, exclude: bool) -> np.ndarray:
        """[rows, graph top] mask of the items each row returns: the first k its user has not seen (all of the
        graph's order), found for the whole batch at once from (user position, item) keys."""
        keep = np.ones(items.shape, bool)
        if exclude and len(self._seen_keys):
            valid = (users[:, None] >= 0) & (items >= 0) & (items < self._stride)
            keys = np.where(valid, users[:, None] * self._stride + items, 0)
            if self._seen_bits is not None:  # one bit per (user, item): a gather, ~20x the sorted lookup
                seen = (self._seen_bits[keys >> 3] >> (7 - (keys & 7))) & 1 == 1
            else:
                found = np.minimum(np.searchsorted(self._seen_keys, keys), len(self._seen_keys) - 1)
                seen = self._seen_keys[found] == keys
            keep = ~(valid & seen)
        return keep & (np.cumsum(keep, axis=1) <= k)


def _seen_keys(raw: dict) -> tuple[np.ndarray, dict[int, int], int]:
    """Every (user, item) seen in training as one sorted, unique int64 key (user's position * stride + item), the
    users' positions, and the stride (one past the largest item id), from seen_items.json's {user: [items]}.

    Built with numpy from the flat item list, not a Python int per pair (~8x faster on the zoo's 87k pairs).
    """
    users = {int(u): i for i, u in enumerate(raw)}
    if len(users) != len(raw):  # one user under two spellings ("7", "07"): the last list counts, as in a dict
        raw = {str(u): items for u, items in {int(u): items for u, items in raw.items()}.items()}
        users = {int(u): i for i, u in enumerate(raw)}
    lists = list(raw.values())
    counts = np.fromiter(map(len, lists), np.int64, len(lists))
    items = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(counts.sum()))
    stride = int(items.max()) + 1 if len(items) else 0
    owners = np.repeat(np.arange(len(lists), dtype=np.int64), counts)
    valid = items >= 0
    keys = np.sort(owners[valid] * stride + items[valid])
    # NOTE: a sort and a neighbour test rather than np.unique, which took ~9x the sort on these 87k keys (numpy 2).
    return keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys, users, stride


# Largest (users x items) grid kept as a bitmap (32 MiB); past it the seen pairs are looked up sorted.
SEEN_BITMAP_BITS = 2**28


def _seen_bits(keys: np.ndarray, *, size: int) -> np.ndarray | None:
    """The seen (user, item) keys as a bitmap (np.packbits order: key's bit 7 - key % 8 of byte key // 8), or
    None when the grid is too large for one."""
    if not len(keys) or size > SEEN_BITMAP_BITS:
        return None
    grid = np.zeros(size, bool)
    grid[keys] = True
    return np.packbits(grid)


@dataclass
class UserColumns:
    """A batch's recommendations as columns: the kept items of every row one after another."""

    user_ids: np.ndarray  # [rows] int64
    known: np.ndarray  # [rows] bool: the user is in the training interactions
    item_ids: np.ndarray  # [sum(returned)] int64
    scores: np.ndarray  # [sum(returned)] float64
    returned: np.ndarray  # [rows] int64: items kept per row

    def __len__(self) -> int:
        return len(self.user_ids)

    def rows(self) -> list[dict]:
        """One dict per row, as the task endpoint returns it (one tolist per column, no numpy scalars)."""
        items, scores, returned = self.item_ids.tolist(), self.scores.tolist(), self.returned.tolist()
        results, start = [], 0
        for user, known, n in zip(self.user_ids.tolist(), self.known.tolist(), returned):
            picks = [{"item_id": it, "score": sc} for it, sc in zip(items[start:start + n], scores[start:start + n])]
            start += n
            result: dict[str, Any] = {"user_id": user, "items": picks, "returned": n}
            if not known:
                result["fallback"] = "popular"
            results.append(result)
        return results

    def arrow(self) -> Any:
        """The same values as one Arrow struct array, typed as Arrow infers `rows()` (`fallback` only where a row
        has it), built from the columns without a Python object per row."""
        # NOTE: pyarrow is the optional `parquet` extra; only the Parquet writer calls this.
        import pyarrow as pa

        offsets = np.concatenate([[0], np.cumsum(self.returned)]).astype(np.int32)
        picks = pa.StructArray.from_arrays([pa.array(self.item_ids), pa.array(self.scores)],
                                           names=["item_id", "score"])
        fields = [pa.array(self.user_ids), pa.ListArray.from_arrays(pa.array(offsets), picks),
                  pa.array(self.returned)]
        names = ["user_id", "items", "returned"]
        if not self.known.all():
            fields.append(pa.array(np.full(len(self), "popular"), pa.string(), mask=self.known))
            names.append("fallback")
        return pa.StructArray.from_arrays(fields, names=names)


def _int_param(value: object, *, default: int, limit: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise InvalidInput(f"'k' must be an integer between 1 and {limit}, got {value!r}")
    k = int(value)
    if not 1 <= k <= limit:
        raise InvalidInput(f"'k' must be between 1 and {limit} (the model returns its top {limit}), got {k}")
    return k


def _bool_param(value: object, *, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidInput(f"'exclude_seen' must be true or false, got {value!r}")
