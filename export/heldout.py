"""Per-model held-out evaluation data and calibration data, regenerated exactly as the build made them.

The split is rebuilt from the ``profile`` and ``seed`` recorded in the parent's metrics.json by calling
the family modules' own data and split functions (so the variants are scored on the very examples
the FP32 model was scored on at build time). Only the bundled/synthetic data sources are supported:
a zoo built from ``--data idx:``/``movielens:`` files cannot be re-split without those files.

``load_heldout(parent)`` -> ``HeldOut``; ``evaluate(parent, onnx_path, heldout, reference=...)`` ->
metrics dict (for ``transformer`` the metric is the mean cosine to the FP32 embeddings, so pass the FP32
outputs as ``reference``; ``fp32_outputs`` computes them).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tokenizers import Tokenizer

from export.common import ParentModel, ort_session
from models import cnn, cnn_data, recommender, speech, transformer
from models import recommender_data as rd
from models import speech_data as sd
from models import transformer_corpus as tc
from models.transformer_text import tokenize

EVAL_BATCH = 64
CALIBRATION_EXAMPLES = 128
TOP_K = 10  # retrieval overlap of the sentence encoder's variants: top-10 neighbours


def retrieval_overlap(teacher: np.ndarray, student: np.ndarray, *, k: int = TOP_K) -> float:
    """Mean |top-k(teacher) & top-k(student)| / k over queries, neighbours by cosine, self excluded."""
    if len(teacher) <= k:
        raise ValueError(f"retrieval overlap needs more than k={k} texts, got {len(teacher)}")

    def neighbours(emb: np.ndarray) -> np.ndarray:
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = neighbours(teacher), neighbours(student)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


@dataclass
class HeldOut:
    """Held-out feeds (batched input dicts), labels and calibration feeds drawn from training data."""

    model: str
    feeds: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    calibration: list[dict[str, np.ndarray]]
    extra: dict[str, Any] = field(default_factory=dict)

    def batch(self, size: int) -> dict[str, np.ndarray]:
        """One input dict of ``size`` held-out rows (repeated when the split is smaller), for timing."""
        first = self.feeds[0]
        rows = [self.feeds[0]]
        while sum(len(f[next(iter(f))]) for f in rows) < size:
            rows.append(self.feeds[len(rows) % len(self.feeds)])
        out = {}
        for name in first:
            # NOTE: text feeds are padded per batch; pad to a common width before concatenating.
            width = max(r[name].shape[1] for r in rows) if first[name].ndim == 2 and name != "user_id" else None
            parts = [_pad(r[name], width) if width else r[name] for r in rows]
            out[name] = np.ascontiguousarray(np.concatenate(parts)[:size])
        return out


def _pad(array: np.ndarray, width: int) -> np.ndarray:
    return np.pad(array, ((0, 0), (0, width - array.shape[1])))


def _batched(arrays: dict[str, np.ndarray], size: int = EVAL_BATCH, *,
             equal: bool = False) -> list[dict[str, np.ndarray]]:
    """Input dicts of ``size`` rows. ``equal``: drop the short last batch (calibration: the histogram
    calibrators stack per-batch activations, which needs one shape)."""
    total = len(next(iter(arrays.values())))
    if equal and total > size:
        total -= total % size
    return [{k: np.ascontiguousarray(v[i:i + size]) for k, v in arrays.items()} for i in range(0, total, size)]


def _cnn(parent: ParentModel) -> HeldOut:
    data = cnn_data.load("digits")
    if parent.card.get("data") != data.source:
        raise ValueError(f"cnn was built on {parent.card.get('data')!r}; held-out data can only be "
                         f"regenerated for the bundled digits ({data.source!r})")
    x_tr, _, x_te, y_te = cnn.split(data, hyper=cnn.HYPER[parent.profile], seed=parent.seed)
    rng = np.random.default_rng(parent.seed)
    calib = x_tr[rng.permutation(len(x_tr))[:CALIBRATION_EXAMPLES]]
    return HeldOut("cnn", _batched({"image": x_te}), y_te, _batched({"image": calib}, 16, equal=True))


def _speech(parent: ParentModel) -> HeldOut:
    if not str(parent.card.get("data", "")).startswith("synthetic"):
        raise ValueError("speech held-out data can only be regenerated for the synthetic (eSpeak) corpus")
    corpus, aug = speech.load_corpus("synth", profile=parent.profile, seed=parent.seed,
                                     cache_dir=speech.default_cache_dir())
    # Same generator seed as models.speech.build, so the same clips (noise, shifts) come out.
    clips, labels = sd.compose(corpus.test, np.random.default_rng(parent.seed + 10_007),
                               noise=corpus.test_noise, aug=aug.for_test())
    train_clips, _ = sd.compose(corpus.train, np.random.default_rng(parent.seed + 1), noise=corpus.train_noise,
                                aug=aug)
    calib = train_clips[np.random.default_rng(parent.seed).permutation(len(train_clips))[:CALIBRATION_EXAMPLES]]
    return HeldOut("speech", _batched({"waveform": clips}), labels, _batched({"waveform": calib}, 16, equal=True))


def _text(parent: ParentModel) -> HeldOut:
    tokenizer = Tokenizer.from_file(str(parent.model_dir / "tokenizer.json"))
    corpus = transformer._load_corpus(transformer.HYPER[parent.profile], parent.seed)
    train, test = tc.grouped_split(corpus, by="owners", folds=transformer.FOLDS, seed=parent.seed)

    def feeds(index: np.ndarray) -> list[dict[str, np.ndarray]]:
        out = []
        for start in range(0, len(index), EVAL_BATCH):
            ids, mask = tokenize(tokenizer, [corpus.texts[i] for i in index[start:start + EVAL_BATCH]])
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    calib = np.random.default_rng(parent.seed).permutation(train)[:CALIBRATION_EXAMPLES]
    return HeldOut(parent.name, feeds(test), corpus.labels[test], feeds(calib))


def _recommender(parent: ParentModel) -> HeldOut:
    if parent.card.get("data_kind") != "synthetic":
        raise ValueError("recommender held-out data can only be regenerated for the synthetic data")
    hyper = recommender.HYPER[parent.profile]
    split = rd.leave_one_out(rd.generate(n_users=hyper.users, n_items=hyper.items, seed=parent.seed))
    users = split.user_raw[split.test_users].astype(np.int64)[:, None]
    seen = [set(split.item_raw[split.train_items[split.train_users == u]].tolist()) for u in split.test_users]
    # The card's protocol (models.recommender.evaluate): the same 99 sampled negatives, same seed.
    negatives = rd.sample_negatives(split, count=recommender.NEGATIVES, seed=parent.seed)
    candidates = np.concatenate([split.test_items[:, None], negatives], axis=1)
    return HeldOut("recommender", _batched({"user_id": users}), split.item_raw[split.test_items],
                   _batched({"user_id": users[:CALIBRATION_EXAMPLES]}, 16, equal=True),
                   {"seen": seen, "candidates": candidates, "seed": parent.seed, "k": recommender.EVAL_K})


_LOADERS = {"cnn": _cnn, "speech": _speech, "transformer": _text, "transformer-classifier": _text,
            "recommender": _recommender}


def load_heldout(parent: ParentModel) -> HeldOut:
    """The held-out split of ``parent`` (as built with its recorded profile and seed)."""
    if parent.profile not in ("tiny", "default"):
        raise ValueError(f"{parent.name}: unknown profile {parent.profile!r} in metrics.json")
    return _LOADERS[parent.name](parent)


def run_outputs(onnx_path: Path, feeds: list[dict[str, np.ndarray]], *, threads: int = 2) -> list[np.ndarray]:
    """All outputs of ``onnx_path`` over ``feeds``, concatenated along the batch axis."""
    session = ort_session(onnx_path, threads=threads)
    runs = [session.run(None, feed) for feed in feeds]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]


def fp32_outputs(parent: ParentModel, heldout: HeldOut) -> list[np.ndarray]:
    return run_outputs(parent.onnx_path, heldout.feeds)


def evaluate(parent: ParentModel, onnx_path: Path, heldout: HeldOut, *,
             reference: list[np.ndarray] | None = None) -> dict[str, float]:
    """Held-out metrics of ``onnx_path`` (a variant of ``parent`` or the parent itself)."""
    outputs = run_outputs(onnx_path, heldout.feeds)
    if parent.name == "transformer":
        if reference is None:
            raise ValueError("transformer: pass the FP32 embeddings as reference= (see fp32_outputs)")
        a, b = outputs[0].astype(np.float64), reference[0].astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        return {"cosine_to_fp32": float(cos.mean()), "cosine_to_fp32_min": float(cos.min()),
                f"top{TOP_K}_retrieval_overlap": retrieval_overlap(b, a), "test_examples": float(len(cos))}
    if parent.name == "recommender":
        return {**_sampled_hit_ratio(onnx_path, heldout), **_hit_ratio(outputs[0], heldout)}
    pred = outputs[0].argmax(axis=1)
    return {"accuracy": float((pred == heldout.labels).mean()), "test_examples": float(len(pred))}


def _with_scores_output(onnx_path: Path, dst: Path) -> Path:
    """A copy of a recommender graph that also outputs the full score matrix (the TopK's input)."""
    model = onnx.load(str(onnx_path))
    topk = next((n for n in model.graph.node if n.op_type == "TopK"), None)
    if topk is None:
        raise ValueError(f"{onnx_path}: expected a recommender graph ending in TopK (none found)")
    model.graph.output.append(onnx.helper.make_tensor_value_info(topk.input[0], onnx.TensorProto.FLOAT, None))
    onnx.save(model, str(dst))
    return dst


def _sampled_hit_ratio(onnx_path: Path, heldout: HeldOut) -> dict[str, float]:
    """The model card's HR@10 / NDCG@10 (NCF protocol: the held-out item ranked among 99 sampled unseen
    items, ties broken at random with the build's seed), from the graph's full score matrix.

    NOTE: the served graph only returns its top 50 items, too few to rank the 99 sampled negatives, so
    the score matrix before the TopK is exposed as an extra output of a temporary copy of the graph.
    """
    from models import recommender_data as rd

    with tempfile.TemporaryDirectory() as tmp:
        scored = _with_scores_output(onnx_path, Path(tmp) / "scores.onnx")
        full = run_outputs(scored, heldout.feeds)[-1]
    picked = np.take_along_axis(full, heldout.extra["candidates"], axis=1)
    hr, ndcg = rd.hit_ratio_ndcg(picked, k=heldout.extra["k"], seed=heldout.extra["seed"])
    return {"hr@10": hr, "ndcg@10": ndcg}


def _hit_ratio(item_ids: np.ndarray, heldout: HeldOut, k: int = 10) -> dict[str, float]:
    """``hr@10_full``: the held-out item is among the first 10 served items not seen in training (all
    unseen items compete, not 99 sampled ones: stricter than the card's ``hr@10``, hence the name)."""
    assert heldout.labels is not None  # _recommender always sets the held-out items as labels
    hits = 0
    for row, target, seen in zip(item_ids, heldout.labels, heldout.extra["seen"]):
        top = [int(i) for i in row if int(i) not in seen][:k]
        hits += int(int(target) in top)
    return {"hr@10_full": hits / len(item_ids), "users_evaluated": float(len(item_ids))}
