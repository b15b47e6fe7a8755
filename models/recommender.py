"""recommender family: two-tower implicit-feedback retrieval with Top-K inside the served graph.

Trains on interactions from a documented generator (``--data synthetic``, see
``models.recommender_data.generate``) or on MovieLens ratings (``--data movielens:PATH``); evaluates
with the NCF protocol (leave-one-out, HR@10 / NDCG@10 against 99 sampled negatives) beside a
popularity baseline; exports ONNX and publishes model ``recommender``.

    python -m models.recommender --profile default --model-repository model_repository
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix
from torch import nn
from tqdm import tqdm

from models import recommender_data as rd
from models.common import (
    FamilyResult,
    check_profile,
    count_parameters,
    export_onnx,
    family_parser,
    hyper_overrides,
    optimizer_step,
    parity_check,
    set_seed,
)
from models.recommender_card import card_markdown, config_pbtxt
from service.modelrepo.publish import publish

NAME = "recommender"
# NOTE: the graph returns more than 10 items so that a caller can drop already-seen items
# (seen_items.json) and still have 10 left for nearly every user.
TOP_K = 50
EVAL_K = 10
NEGATIVES = 99
MAX_RAW_USER_ID = 10_000_000  # the served graph holds a raw-id -> index table of this length at most


@dataclass(frozen=True)
class Hyper:
    dim: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    users: int = 3000
    items: int = 1500


HYPER = {
    "tiny": Hyper(dim=8, epochs=20, batch_size=64, lr=1e-2, users=200, items=300),
    "default": Hyper(dim=32, epochs=30, batch_size=128, lr=5e-3, weight_decay=0.01),
}


class Tower(nn.Module):
    """ID embedding followed by a residual two-layer MLP."""

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(count, dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embedding.weight if ids is None else self.embedding(ids)
        return x + self.mlp(x)


class TwoTower(nn.Module):
    """score(user, item) = user_tower(user) . item_tower(item) + item_bias(item)."""

    def __init__(self, *, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.users, self.items = Tower(n_users, dim), Tower(n_items, dim)
        self.item_bias = nn.Parameter(torch.zeros(n_items))

    def all_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.users(users) @ self.items().T + self.item_bias


class ServedRecommender(nn.Module):
    """The exported graph: raw user id [B, 1] -> top-K raw item ids and scores.

    Tower outputs are precomputed (they depend only on ids), so serving is a gather, one matmul and
    TopK. Unknown or out-of-range user ids get the items ranked by training popularity instead, with
    scores ``1 - rank / n_items`` (not comparable with personal scores).
    """

    # Buffers registered in __init__ (declared for type checkers; nn.Module.__getattr__ is untyped).
    user_vectors: torch.Tensor
    item_matrix: torch.Tensor
    item_bias: torch.Tensor
    lookup: torch.Tensor
    item_raw: torch.Tensor
    popular: torch.Tensor

    def __init__(self, model: TwoTower, split: rd.Split, *, k: int) -> None:
        super().__init__()
        with torch.no_grad():
            user_vectors = model.users()
            item_matrix = model.items().T.contiguous()
        self.k = k
        self.register_buffer("user_vectors", user_vectors.detach().clone())
        self.register_buffer("item_matrix", item_matrix.detach().clone())
        self.register_buffer("item_bias", model.item_bias.detach().clone())
        lookup = torch.full((int(split.user_raw.max()) + 1,), -1, dtype=torch.int64)
        lookup[torch.from_numpy(split.user_raw)] = torch.arange(split.n_users)
        self.register_buffer("lookup", lookup)
        self.register_buffer("item_raw", torch.from_numpy(split.item_raw.astype(np.int64)))
        order = np.lexsort((np.arange(split.n_items), -split.train_counts()))
        popular = np.empty(split.n_items, np.float32)
        popular[order] = 1.0 - np.arange(split.n_items, dtype=np.float32) / split.n_items
        self.register_buffer("popular", torch.from_numpy(popular))

    def forward(self, user_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = user_id[:, 0]
        size = self.lookup.shape[0]
        index = self.lookup[raw.clamp(0, size - 1)]
        known = (raw >= 0) & (raw < size) & (index >= 0)
        personal = self.user_vectors[index.clamp(min=0)] @ self.item_matrix + self.item_bias
        scores = torch.where(known[:, None], personal, self.popular[None, :])
        top_scores, top_index = torch.topk(scores, self.k, dim=1)
        return self.item_raw[top_index], top_scores


def train(model: TwoTower, split: rd.Split, *, hyper: Hyper, seed: int) -> None:
    """Full-softmax cross-entropy over the catalogue, summed over each user's training events.

    One row per user holds all of that user's events (the multinomial likelihood of Mult-VAE, Liang et
    al. 2018), which is the same loss as one softmax per (user, item) event but computes each user's
    scores once per epoch, not once per event. NOTE: catalogues here are small (thousands of items),
    so the exact softmax is cheap and avoids the bias of sampled negatives.
    """
    matrix = csr_matrix((np.ones(len(split.train_users), np.float32), (split.train_users, split.train_items)),
                        shape=(split.n_users, split.n_items))
    gen = torch.Generator().manual_seed(seed)
    steps = hyper.epochs * ((split.n_users + hyper.batch_size - 1) // hyper.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hyper.lr, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc="recommender train", unit="step", leave=False, mininterval=1.0) as bar:
        for _ in range(hyper.epochs):
            order = torch.randperm(split.n_users, generator=gen)
            for start in range(0, split.n_users, hyper.batch_size):
                users = order[start:start + hyper.batch_size]
                events = torch.from_numpy(matrix[users.numpy()].toarray())
                log_p = F.log_softmax(model.all_scores(users), dim=1)
                loss = -(events * log_p).sum() / events.sum().clamp(min=1.0)
                optimizer_step(loss, opt=opt, sched=sched, bar=bar)
    model.eval()


def evaluate(model: TwoTower, split: rd.Split, *, seed: int) -> dict[str, float]:
    """NCF protocol: rank each user's held-out item among 99 unseen sampled items."""
    negatives = rd.sample_negatives(split, count=NEGATIVES, seed=seed)
    candidates = np.concatenate([split.test_items[:, None], negatives], axis=1)
    with torch.no_grad():
        full = torch.cat([model.all_scores(torch.from_numpy(split.test_users[i:i + 1024]))
                          for i in range(0, len(split.test_users), 1024)]).numpy()
    model_scores = np.take_along_axis(full, candidates, axis=1)
    pop_scores = split.train_counts()[candidates].astype(np.float64)
    hr, ndcg = rd.hit_ratio_ndcg(model_scores, k=EVAL_K, seed=seed)
    pop_hr, pop_ndcg = rd.hit_ratio_ndcg(pop_scores, k=EVAL_K, seed=seed)
    return {"hr@10": hr, "ndcg@10": ndcg, "popularity_hr@10": pop_hr, "popularity_ndcg@10": pop_ndcg,
            "users_evaluated": float(len(split.test_users))}


def write_assets(split: rd.Split, folder: Path) -> dict[str, Path]:
    """seen_items.json (raw user -> raw items seen in training, oldest first) and item_popularity.json."""
    seen: dict[str, list[int]] = {}
    for user, item in zip(split.train_users.tolist(), split.train_items.tolist()):
        seen.setdefault(str(int(split.user_raw[user])), []).append(int(split.item_raw[item]))
    counts = split.train_counts()
    order = np.lexsort((np.arange(split.n_items), -counts))
    popularity = {"items": split.item_raw[order].tolist(), "counts": counts[order].tolist()}
    paths = {"seen_items.json": folder / "seen_items.json", "item_popularity.json": folder / "item_popularity.json"}
    paths["seen_items.json"].write_text(json.dumps(seen, separators=(",", ":")))
    paths["item_popularity.json"].write_text(json.dumps(popularity, separators=(",", ":")))
    return paths


def load_data(spec: str, *, hyper: Hyper, seed: int, min_rating: float) -> rd.Interactions:
    kind, _, arg = spec.partition(":")
    if kind == "synthetic" and not arg:
        return rd.generate(n_users=hyper.users, n_items=hyper.items, seed=seed)
    if kind == "movielens" and arg:
        return rd.load_movielens(Path(arg), min_rating=min_rating)
    raise ValueError(f"--data {spec!r}: expected 'synthetic' or 'movielens:PATH'")


def _parity_cases(split: rd.Split) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(0)
    known = split.user_raw
    unknown = np.array([-5, 0, int(known.max()) + 1, int(known.max()) + 10**6])
    cases: list[tuple[np.ndarray, ...]] = []
    for n in (1, 3, 17):
        ids = rng.choice(known, n)
        if n > 1:  # mix in unknown ids so the popularity fallback is checked too
            ids[-1] = unknown[n % len(unknown)]
        cases.append((ids.astype(np.int64)[:, None],))
    return cases


def export_graph(served: ServedRecommender, split: rd.Split, onnx_path: Path) -> dict:
    """Export the served graph to ``onnx_path`` and check its parity with PyTorch on known and unknown
    user ids (also used for the distilled student, export.distill_recommender). Returns the parity report."""
    example = torch.from_numpy(split.user_raw[:2].astype(np.int64))[:, None]
    export_onnx(served, (example,), onnx_path, input_names=["user_id"], output_names=["item_ids", "scores"],
                dynamic_shapes={"user_id": {0: torch.export.Dim("batch", min=1, max=4096)}})
    return parity_check(served, onnx_path, _parity_cases(split), atol=1e-4, rtol=1e-4)


def _export_and_publish(*, served: ServedRecommender, split: rd.Split, card: dict, repo_dir: Path,
                        tmp: Path) -> dict:
    onnx_path = tmp / "model.onnx"
    card["parity"] = export_graph(served, split, onnx_path)
    publish(repo_dir=repo_dir, name=NAME, onnx_path=onnx_path, config_pbtxt=config_pbtxt(NAME, served.k),
            card=card, card_md=card_markdown(card), assets=write_assets(split, tmp))
    return card["parity"]


def build(*, profile: str, repo_dir: Path, seed: int = 0, work_dir: Path | None = None,
          data: str = "synthetic", hyper: Hyper | None = None, min_rating: float = 0.0) -> FamilyResult:
    """Train, evaluate (NCF protocol), export, parity-check and publish the ``recommender`` model."""
    start = time.perf_counter()
    hyper = hyper or HYPER[check_profile(profile)]
    set_seed(seed)
    interactions = load_data(data, hyper=hyper, seed=seed, min_rating=min_rating)
    split = rd.leave_one_out(interactions)
    if int(split.user_raw.min()) < 0 or int(split.user_raw.max()) >= MAX_RAW_USER_ID:
        raise ValueError(f"raw user ids must lie in [0, {MAX_RAW_USER_ID}); remap them first")
    model = TwoTower(n_users=split.n_users, n_items=split.n_items, dim=hyper.dim)
    train(model, split, hyper=hyper, seed=seed)
    metrics = evaluate(model, split, seed=seed)
    served = ServedRecommender(model, split, k=min(TOP_K, split.n_items))
    card: dict[str, Any] = {
        "family": NAME, "task": "implicit-feedback top-K retrieval", "data": interactions.source,
        "data_kind": data.partition(":")[0],
        "split": f"leave-one-out (last event per user held out), {NEGATIVES} sampled negatives; "
                 f"{len(split.train_users)} train events, {len(split.test_users)} test users",
        "parameters": count_parameters(model), "metrics": metrics,
        "input_spec": {"name": "user_id", "shape": [-1, 1], "dtype": "INT64",
                       "ids": "raw user ids as in the data; unknown ids get popular items"},
        "output_spec": {"item_ids": f"INT64 [batch, {served.k}] raw item ids, best first",
                        "scores": f"FP32 [batch, {served.k}]"},
        "top_k": served.k,
        "training": {"epochs": hyper.epochs, "dim": hyper.dim, "users": split.n_users, "items": split.n_items},
        "profile": profile, "seed": seed,
    }
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        card["build_seconds"] = round(time.perf_counter() - start, 2)
        parity = _export_and_publish(served=served, split=split, card=card, repo_dir=repo_dir, tmp=Path(tmp))
    headline = {k: metrics[k] for k in ("hr@10", "ndcg@10", "popularity_hr@10")}
    return FamilyResult(NAME, [NAME], headline, card["parameters"], round(time.perf_counter() - start, 2),
                        parity["max_abs_diff"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = family_parser("recommender", __doc__)
    parser.add_argument("--data", default="synthetic", help="synthetic | movielens:PATH (ratings.dat/.csv)")
    parser.add_argument("--min-rating", type=float, default=0.0, help="MovieLens: ratings below are dropped")
    parser.add_argument("--dim", type=int, help="override the profile's embedding size")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = build(profile=args.profile, repo_dir=args.repo, seed=args.seed, data=args.data,
                   hyper=replace(HYPER[args.profile], **hyper_overrides(args, "dim")), min_rating=args.min_rating)
    m = result.metrics
    print(f"recommender: HR@10 {m['hr@10']:.4f}, NDCG@10 {m['ndcg@10']:.4f} (popularity HR@10 "
          f"{m['popularity_hr@10']:.4f}), {result.parameters:,} parameters, {result.build_seconds:.1f} s "
          f"-> {args.repo / NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
