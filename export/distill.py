"""Knowledge distillation: smaller students of the cnn, speech, transformer (sentence encoder) and recommender
models.

    python -m export.distill --model-repository DIR [--families cnn,speech,transformer,recommender] [--publish]

Classification students (cnn, speech) learn from Hinton et al.'s loss ("Distilling the Knowledge in a
Neural Network", 2015): KL divergence between the teacher's and the student's distributions softened at
temperature T, scaled by T^2 (so its gradients keep their size as T changes), mixed with cross-entropy
on the hard labels. The teacher is the *served* FP32 ONNX model run through ONNX Runtime; it outputs
softmax probabilities, not logits. We use log-probabilities as teacher logits: log softmax(z) = z -
logsumexp(z) differs from z by a per-row constant and softmax is shift-invariant, so
softmax(log p / T) == softmax(z / T) exactly (up to float rounding of p; p is clamped at 1e-30).

The sentence-encoder student (export/distill_text.py) is three of MiniLM's six layers with narrower FFNs,
trained to reproduce the teacher's embeddings, token states and attention (export/distill_text_train.py);
the recommender student (export/distill_recommender.py) is the two-tower model with narrower towers,
trained on the teacher's listwise ranking. ``build_student`` returns a ``StudentResult`` (student ONNX,
held-out metrics of student and teacher measured the same way, parameter counts, side-by-side latency)
or None for families without a student and when the teacher is too small to shrink.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from export import distill_classify, distill_recommender, distill_text
from export.common import BUDGETS, load_parent, publish_variant
from export.distill_common import LATENCY_BATCH, StudentResult
from models.common import check_profile, torch_threads

FAMILIES = ("cnn", "speech", "transformer", "recommender")


def build_student(family: str, /, *, repo_dir: Path, work_dir: Path, profile: str,
                  text_options: dict[str, Any] | None = None) -> StudentResult | None:
    """Distil a student of ``family``'s model in ``repo_dir``; None for families without one.

    ``profile`` (tiny|default) sets the training budget; the teacher's own held-out split is rebuilt from
    the profile and seed recorded in its model card. ``text_options`` (``layers``, ``init_layers``, ``threads``,
    and ``distill_text.text_overrides``'s ``epochs``, ``ffn``, ``minutes``, ``max_texts``, ``lr``) override the
    sentence-encoder student's defaults.
    """
    check_profile(profile)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if family not in FAMILIES:
        return None
    # NOTE: one thread, as the families train: these models are small, so a second thread adds
    # synchronisation; on the shared 2-core machine 2 threads made cnn distillation ~30x slower
    # (1.9 s vs 0.06 s per step).
    with torch_threads(1):
        if family == "recommender":
            return distill_recommender.build(repo_dir=Path(repo_dir), work_dir=work_dir, profile=profile)
        if family == "transformer":
            options = dict(text_options or {})
            layers, init = options.pop("layers", None), options.pop("init_layers", None)
            with torch_threads(int(options.pop("threads", 1))):
                return distill_text.build(repo_dir=Path(repo_dir), work_dir=work_dir, profile=profile,
                                          layers=int(layers) if layers else None, options=options,
                                          init_layers=tuple(int(i) for i in init) if init else None)
        return distill_classify.build(family, repo_dir=Path(repo_dir), work_dir=work_dir, profile=profile)


def publish_student(result: StudentResult, *, repo_dir: Path) -> Path | None:
    """Publish ``<model>-student`` when it is within budget; a student over budget is not published."""
    if not result.within_budget:
        return None
    parent = load_parent(repo_dir, result.model)
    extra = {"metrics": result.metrics, "teacher_metrics": result.teacher_metrics,
             "parameters": result.parameters, "budget": result.budget, "latency_ms": result.latency_ms,
             "distillation": result.details}
    return publish_variant(repo_dir=repo_dir, parent=parent, variant="student", onnx_path=result.onnx_path,
                           card_extra=extra)


def publish_student_int8(result: StudentResult, *, repo_dir: Path) -> Path | None:
    """Publish ``<model>-student-int8`` (the sentence-encoder student as INT8 dynamic) when THAT variant meets
    the student budget itself, as served (``export.text_student_int8.served_verdicts``); neither the FP32
    student's verdict nor the teacher's INT8 carries over."""
    served = result.details.get("served")
    if not served or not served["publish"].get("student-int8"):
        return None
    row = served["rows"]["student-int8"]
    metrics = {"cosine_to_fp32": row["cosine"], "cosine_to_fp32_min": row["cosine_min"],
               "top10_retrieval_overlap": row["top10_overlap"], f"speedup_b{LATENCY_BATCH}": row["speedup"]}
    extra = {"metrics": metrics, "teacher_metrics": result.teacher_metrics, "parameters": result.parameters,
             "budget": result.budget, "latency_ms": served["latency_ms"], "quantization": "INT8 dynamic, per-channel",
             "why": served["why"]["student-int8"], "distillation": {k: v for k, v in result.details.items()
                                                                   if k != "served"}}
    return publish_variant(repo_dir=repo_dir, parent=load_parent(repo_dir, result.model), variant="student-int8",
                           onnx_path=Path(served["paths"]["student-int8"]), card_extra=extra)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated layer indices, e.g. 0,2,4,5") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    parser.add_argument("--profile", choices=("tiny", "default"), default="default")
    parser.add_argument("--work-dir", type=Path, default=Path("distill_work"))
    parser.add_argument("--publish", action="store_true", help="publish students within budget as <model>-student")
    parser.add_argument("--report", type=Path, help="write the results as JSON here")
    parser.add_argument("--text-layers", type=int, help="sentence-encoder student layers (default: teacher's / 3)")
    parser.add_argument("--text-epochs", type=float,
                        help="sentence-encoder student epochs, may be fractional (default: profile's)")
    parser.add_argument("--text-ffn", type=int, help="sentence-encoder student FFN width (default: profile's)")
    parser.add_argument("--text-minutes", type=float,
                        help="sentence-encoder student training time budget; the learning rate anneals over it")
    parser.add_argument("--text-init-layers", type=_layer_list,
                        help="teacher layers the sentence-encoder student copies, e.g. 0,2,4,5 (default: spread)")
    parser.add_argument("--text-texts", type=int, help="sentence-encoder student training texts (default: profile's)")
    parser.add_argument("--text-lr", type=float, help="sentence-encoder student peak learning rate (default: profile's)")
    parser.add_argument("--text-neighbours", type=float,
                        help="weight of the sentence-encoder student's neighbour-ranking loss (default: none)")
    parser.add_argument("--text-threads", type=int, help="torch threads for the sentence-encoder student (default 1)")
    parser.add_argument("--plot", type=Path, help="write a PNG comparing teachers and students here")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}: expected a subset of {','.join(FAMILIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    for family in args.families:
        text_options = {k: v for k, v in (("layers", args.text_layers), ("epochs", args.text_epochs),
                                          ("ffn", args.text_ffn), ("minutes", args.text_minutes),
                                          ("threads", args.text_threads), ("init_layers", args.text_init_layers),
                                          ("max_texts", args.text_texts), ("lr", args.text_lr),
                                          ("neighbours", args.text_neighbours)) if v}
        result = build_student(family, repo_dir=args.model_repository, work_dir=args.work_dir / family,
                               profile=args.profile, text_options=text_options)
        if result is None:
            print(f"{family}: no student (teacher too small to shrink)")
            continue
        published = [p for p in (publish_student(result, repo_dir=args.model_repository),
                                 publish_student_int8(result, repo_dir=args.model_repository)) if p] \
            if args.publish else []
        results.append({**result.as_dict(), "published": [str(p) for p in published] or None})
        headline = {k: round(v, 4) for k, v in result.metrics.items()}
        print(f"{family}: student {result.parameters:,} params (teacher {result.teacher_parameters:,}), "
              f"held-out {headline}, teacher {result.teacher_metrics}, p50 ms at batch {LATENCY_BATCH} "
              f"{result.latency_ms}, {result.budget}: {'ok' if result.within_budget else 'MISSED'}"
              f"{', published' if published else ''}")
    if args.report:
        args.report.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot and results:
        plot(results, args.plot)
    return 0


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Per family: parameters, p50 latency at batch 32 and the held-out headline metric, teacher vs student."""
    import matplotlib  # NOTE: heavy and only needed for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["family"] for r in results]
    metric = [BUDGETS[r["model"]].metric for r in results]
    panels = [
        ("parameters", [r["teacher_parameters"] for r in results], [r["parameters"] for r in results], True),
        (f"p50 ms, batch {LATENCY_BATCH}", [r["latency_ms"]["teacher"] for r in results],
         [r["latency_ms"]["student"] for r in results], True),
        ("held-out budget metric (accuracy / cosine / HR@10)", [r["teacher_metrics"].get(m, 1.0) for r, m in zip(results, metric)],
         [r["metrics"][m] for r, m in zip(results, metric)], False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = np.arange(len(names))
    for ax, (title, teacher, student, log) in zip(axes, panels):
        ax.bar(x - 0.2, teacher, 0.4, label="teacher (FP32)")
        ax.bar(x + 0.2, student, 0.4, label="distilled student")
        ax.set_xticks(x, names)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
