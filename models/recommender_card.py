"""Serving config and model card text for the recommender family."""

from __future__ import annotations

import inspect

from models.recommender_data import generate


def config_pbtxt(name: str, k: int) -> str:
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 256
input [ {{ name: "user_id" data_type: TYPE_INT64 dims: [ 1 ] }} ]
output [
  {{ name: "item_ids" data_type: TYPE_INT64 dims: [ {k} ] }},
  {{ name: "scores" data_type: TYPE_FP32 dims: [ {k} ] }}
]
dynamic_batching {{ preferred_batch_size: [ 32, 64 ] max_queue_delay_microseconds: 500 }}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def _generator_doc() -> str:
    return inspect.cleandoc(generate.__doc__ or "")


def _generator_section(card: dict) -> str:
    if card["data_kind"] != "synthetic":
        return ""
    return f"## Synthetic data generator\n\n{_generator_doc()}\n"


def card_markdown(card: dict) -> str:
    m, p, t = card["metrics"], card["parity"], card["training"]
    k = card["top_k"]
    return f"""# recommender: two-tower implicit-feedback retrieval

- **Task**: {card["task"]}. **Data**: {card["data"]}.
- **Split / protocol** (NCF paper, He et al. 2017): {card["split"]}; each held-out item is ranked among
  99 items the user never interacted with, sampled uniformly; ties broken at random.
- **Model**: user and item towers (ID embedding of size {t["dim"]} + residual MLP), score = dot product +
  item bias, trained {t["epochs"]} epochs with full-softmax cross-entropy; {card["parameters"]:,} parameters
  ({t["users"]} users, {t["items"]} items).

| held-out (leave-one-out) | model | popularity baseline |
|---|---|---|
| HR@10 | {m["hr@10"]:.4f} | {m["popularity_hr@10"]:.4f} |
| NDCG@10 | {m["ndcg@10"]:.4f} | {m["popularity_ndcg@10"]:.4f} |

Users evaluated: {int(m["users_evaluated"])}. The popularity baseline scores items by their training count.

## Serving

- **Input** `user_id`: INT64 `[batch, 1]`, raw user ids as in the training data.
- **Outputs** `item_ids`: INT64 `[batch, {k}]` raw item ids, best first; `scores`: FP32 `[batch, {k}]`.
  K = {k} (more than 10) so a caller can drop items the user has already seen and still show 10.
- The graph does not exclude seen items. Assets: `seen_items.json` (raw user id -> raw item ids seen
  in training, oldest first) and `item_popularity.json` (`items` by training count, `counts`).
- Unknown user ids (never seen, negative or out of range) get the most popular items, with scores
  `1 - rank / n_items`; these are not comparable with personal scores. The model was trained without
  each user's held-out last event.

ONNX Runtime vs PyTorch parity: max abs diff {p["max_abs_diff"]:.2e} on scores (atol {p["atol"]:g}), item
ids identical, batches {[c[0][0] for c in p["cases"]]}. Profile `{card["profile"]}`, seed {card["seed"]},
built in {card["build_seconds"]:.1f} s.

{_generator_section(card)}"""
