"""Interaction data for the recommender family: a documented generator, MovieLens loaders, and the
NCF paper's leave-one-out evaluation protocol (He et al., 2017, "Neural Collaborative Filtering")."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Interactions:
    """Implicit feedback: one row per (user, item) event, with raw (external) ids and a time order."""

    users: np.ndarray  # int64 raw user ids
    items: np.ndarray  # int64 raw item ids
    times: np.ndarray  # int64, larger = later
    source: str


@dataclass
class Split:
    """Dense-indexed leave-one-out split: all but each user's last event for training."""

    user_raw: np.ndarray  # index -> raw user id
    item_raw: np.ndarray  # index -> raw item id
    train_users: np.ndarray
    train_items: np.ndarray
    test_users: np.ndarray  # users with >= 2 events
    test_items: np.ndarray  # their last event
    history: list[np.ndarray]  # all item indices per user (train + test), for negative sampling

    @property
    def n_users(self) -> int:
        return len(self.user_raw)

    @property
    def n_items(self) -> int:
        return len(self.item_raw)

    def train_counts(self) -> np.ndarray:
        return np.bincount(self.train_items, minlength=self.n_items)


def generate(*, n_users: int, n_items: int, seed: int, dim: int = 16, zipf_exponent: float = 1.0,
             taste: float = 2.5, mean_events: int = 30, min_events: int = 5) -> Interactions:
    """Synthetic implicit feedback from latent factors with Zipf-like item popularity.

    Generative story (all draws from ``numpy.random.default_rng(seed)``):

    1. user factors ``u ~ N(0, I_dim)``, item factors ``v ~ N(0, I_dim)``;
    2. items get popularity ranks from a random permutation; ``pop(i) = rank(i) ** -zipf_exponent``;
    3. the affinity of user u for item i is ``taste * u.v / sqrt(dim) + log pop(i)``, so a user's
       choice probabilities are ``softmax`` over items of that affinity (personal taste times
       a Zipf popularity prior);
    4. each user has ``min_events + Geometric(1 / (mean_events - min_events))`` events (capped at half
       the catalogue), drawn without replacement from that softmax (Gumbel top-k trick);
    5. the events of a user are put in a random time order, so the held-out last event is an
       ordinary draw from the user's preferences, not the least preferred one.
    """
    if n_items < 4 or n_users < 2 or mean_events <= min_events:
        raise ValueError("generate needs n_items >= 4, n_users >= 2 and mean_events > min_events")
    rng = np.random.default_rng(seed)
    users_f = rng.standard_normal((n_users, dim))
    items_f = rng.standard_normal((n_items, dim))
    log_pop = -zipf_exponent * np.log(rng.permutation(n_items) + 1.0)
    lengths = np.minimum(min_events + rng.geometric(1.0 / (mean_events - min_events), n_users), n_items // 2)
    rows_u, rows_i, rows_t = [], [], []
    for start in range(0, n_users, 512):  # chunks keep the Gumbel matrix small
        block = slice(start, min(start + 512, n_users))
        logits = taste * users_f[block] @ items_f.T / np.sqrt(dim) + log_pop
        keys = logits + rng.gumbel(size=logits.shape)
        chosen = np.argsort(-keys, axis=1)
        for offset, row in enumerate(chosen):
            user = start + offset
            picked = rng.permutation(row[: lengths[user]])
            rows_u.append(np.full(len(picked), user))
            rows_i.append(picked)
            rows_t.append(np.arange(len(picked)))
    desc = (f"synthetic (seed {seed}): {n_users} users, {n_items} items, dim {dim}, taste {taste}, "
            f"Zipf exponent {zipf_exponent}, ~{mean_events} events/user")
    # Raw ids start at 1, as in MovieLens.
    return Interactions(np.concatenate(rows_u) + 1, np.concatenate(rows_i) + 1, np.concatenate(rows_t), desc)


def load_movielens(path: Path, *, min_rating: float = 0.0) -> Interactions:
    """MovieLens ratings: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, ML-1M/10M) or
    ``ratings.csv`` (``userId,movieId,rating,timestamp`` with header, ML-latest/20M/25M).

    ``path`` may be the file or a folder holding one. Every rating >= ``min_rating`` is one implicit
    interaction (the NCF paper keeps all ratings).
    """
    if path.is_dir():
        found = [path / n for n in ("ratings.dat", "ratings.csv") if (path / n).is_file()]
        if not found:
            raise ValueError(f"movielens:{path}: no ratings.dat or ratings.csv in that folder")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"movielens:{path}: file not found (expected ratings.dat or ratings.csv)")
    rows = _read_dat(path) if path.suffix == ".dat" else _read_csv(path)
    if not rows:
        raise ValueError(f"{path}: no ratings read")
    data = np.asarray(rows, dtype=np.float64)
    keep = data[:, 2] >= min_rating
    data = data[keep]
    return Interactions(data[:, 0].astype(np.int64), data[:, 1].astype(np.int64), data[:, 3].astype(np.int64),
                        f"MovieLens {path.name} ({len(data)} ratings >= {min_rating} as implicit feedback)")


def _read_dat(path: Path) -> list[tuple[float, ...]]:
    rows = []
    with path.open(encoding="latin-1") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.strip().split("::")
            if len(parts) != 4:
                raise ValueError(f"{path}:{number}: expected UserID::MovieID::Rating::Timestamp, got {line!r}")
            rows.append(tuple(float(p) for p in parts))
    return rows


def _read_csv(path: Path) -> list[tuple[float, ...]]:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        if [h.strip() for h in header[:4]] != ["userId", "movieId", "rating", "timestamp"]:
            raise ValueError(f"{path}: expected header userId,movieId,rating,timestamp, got {header}")
        return [tuple(float(v) for v in row[:4]) for row in reader if row]


def leave_one_out(data: Interactions) -> Split:
    """Index users and items densely; hold out each user's last event (by time, then file order)."""
    user_raw, users = np.unique(data.users, return_inverse=True)
    item_raw, items = np.unique(data.items, return_inverse=True)
    order = np.lexsort((np.arange(len(users)), data.times, users))
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    last = ends - 1
    held = last[(ends - starts) >= 2]
    train_mask = np.ones(len(users), bool)
    train_mask[held] = False
    history = [items[s:e] for s, e in zip(starts, ends)]
    return Split(user_raw, item_raw, users[train_mask], items[train_mask], users[held], items[held], history)


def sample_negatives(split: Split, *, count: int, seed: int) -> np.ndarray:
    """``count`` items per test user, uniformly among the items that user never interacted with."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(split.test_users), count), np.int64)
    for row, user in enumerate(split.test_users):
        seen = set(split.history[user].tolist())
        if split.n_items - len(seen) < count:
            raise ValueError(f"user {split.user_raw[user]} has seen all but {split.n_items - len(seen)} "
                             f"items; {count} negatives needed")
        picked: list[int] = []
        while len(picked) < count:
            for item in rng.integers(0, split.n_items, 2 * count).tolist():
                if item not in seen and len(picked) < count:
                    seen.add(item)
                    picked.append(item)
        out[row] = picked
    return out


def hit_ratio_ndcg(scores: np.ndarray, *, k: int, seed: int) -> tuple[float, float]:
    """HR@k and NDCG@k where column 0 of ``scores`` [users, 1 + negatives] is the held-out item.

    Ties are broken uniformly at random, so a constant scorer gets chance level, not a perfect score.
    """
    rng = np.random.default_rng(seed)
    positive = scores[:, :1]
    higher = (scores[:, 1:] > positive).sum(1)
    ties = (scores[:, 1:] == positive).sum(1)
    rank = higher + rng.integers(0, ties + 1)
    hit = rank < k
    return float(hit.mean()), float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())


@dataclass
class Validation:
    """A validation split carved out of a ``Split``'s training events, for model selection.

    ``train`` is the split with each validation user's last *training* event removed from its training
    events (its test item and history untouched: ``sample_negatives`` on it still avoids every item the
    user ever saw); ``users``/``items`` are those removed events, the validation targets.
    """

    train: Split
    users: np.ndarray
    items: np.ndarray

    def as_test(self) -> Split:
        """``train`` with the validation events in place of the test ones: score it as a test split."""
        return Split(self.train.user_raw, self.train.item_raw, self.train.train_users, self.train.train_items,
                     self.users, self.items, self.train.history)


def validation_split(split: Split, *, fraction: float, seed: int) -> Validation:
    """Hold out the last training event of a seeded ``fraction`` of the users with >= 2 training events.

    The test split (each user's last event) is not touched: choose hyper-parameters on these events, then
    train on all of ``split``'s training events and report test metrics once.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    counts = np.bincount(split.train_users, minlength=split.n_users)
    eligible = np.flatnonzero(counts >= 2)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(eligible, size=max(1, round(fraction * len(eligible))), replace=False))
    # Training events are in time order per user (leave_one_out sorts them), so a user's last row is its latest.
    last_row = np.r_[np.flatnonzero(split.train_users[1:] != split.train_users[:-1]), len(split.train_users) - 1]
    held = last_row[np.isin(split.train_users[last_row], chosen)]
    keep = np.ones(len(split.train_users), bool)
    keep[held] = False
    train = Split(split.user_raw, split.item_raw, split.train_users[keep], split.train_items[keep],
                  split.test_users, split.test_items, split.history)
    return Validation(train, split.train_users[held], split.train_items[held])
