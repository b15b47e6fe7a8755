"""``modelserve optimize``: INT8, FP16 and distilled variants of the zoo, measured and reported.

    modelserve optimize [--model-repository DIR] [--families cnn,transformer,speech,recommender]
                        [--output DIR] [--publish]

Per model: FP32, INT8, FP16, student and student+INT8 rows (file size, p50 latency at batch 1 and 32
measured side by side in one interleaved run on this CPU, held-out metric, delta vs FP32, budget
verdict), written as markdown, JSON and a PNG plot. ``--publish`` adds every variant within its budget
to the repository as ``<model>-<variant>``; variants over budget are never published.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from export import fp16, quantize, report
from export.common import (
    BUDGETS,
    FAMILY_MODELS,
    ParentModel,
    check_budget,
    file_size_mb,
    load_parent,
    measure_latency,
    publish_if_within_budget,
)
from export.heldout import HeldOut, evaluate, fp32_outputs, load_heldout


@dataclasses.dataclass
class Variant:
    """One row of the report before timing: where the graph is and how it scored."""

    name: str
    path: Path | None
    metrics: dict[str, float] | None = None
    status: str = "ok"
    notes: str = ""
    card: dict[str, Any] = dataclasses.field(default_factory=dict)


def _int8(parent: ParentModel, heldout: HeldOut, *, work: Path, fp32: dict[str, float], ref: Any,
          name: str = "int8") -> Variant:
    result = quantize.quantize(parent, heldout, work_dir=work / name, fp32_metrics=fp32, reference=ref)
    kept = ", ".join(result.kept_fp32) or "nothing"
    return Variant(name, result.path, result.metrics,
                   notes=f"{result.method}; kept FP32: {kept}; int ops {quantize.integer_op_counts(result.path)}",
                   card={"method": result.method, "kept_fp32": result.kept_fp32, "attempts": result.attempts})


def _fp16(parent: ParentModel, heldout: HeldOut, *, work: Path, ref: Any) -> Variant:
    work.mkdir(parents=True, exist_ok=True)
    result = fp16.to_fp16(parent.onnx_path, work / f"{parent.name}-fp16.onnx")
    if not result.runs_on_cpu:
        return Variant("fp16", None, status="GPU only", notes=result.cpu_note)
    metrics = evaluate(parent, result.path, heldout, reference=ref)
    return Variant("fp16", result.path, metrics, notes=result.cpu_note,
                   card={"target_device": "GPU", "cpu_note": result.cpu_note, "kept_fp32": fp16.EXTRA_BLOCK})


def _students(parent: ParentModel, heldout: HeldOut, *, repo: Path, work: Path, fp32: dict[str, float],
              ref: Any) -> list[Variant]:
    try:
        from export import distill
    except ImportError as exc:
        return [Variant(n, None, status="not built", notes=f"export.distill unavailable: {exc}")
                for n in ("student", "student-int8")]
    if parent.name not in FAMILY_MODELS[parent.family][:1]:
        return [Variant(n, None, status="not built", notes="no student for this model")
                for n in ("student", "student-int8")]
    student = distill.build_student(parent.family, repo_dir=repo, work_dir=work / "student", profile=parent.profile)
    if student is None:
        return [Variant(n, None, status="not built", notes="distill.build_student returned None")
                for n in ("student", "student-int8")]
    metrics = evaluate(parent, Path(student.onnx_path), heldout, reference=ref)
    card = {"parameters": student.parameters, "teacher_parameters": student.teacher_parameters,
            "distillation": student.details}
    rows = [Variant("student", Path(student.onnx_path), metrics, notes=f"{student.parameters} params", card=card)]
    as_parent = dataclasses.replace(parent, onnx_path=Path(student.onnx_path))
    q = _int8(as_parent, heldout, work=work, fp32=fp32, ref=ref, name="student-int8")
    q.card.update({"parameters": student.parameters})
    return [*rows, q]


def build_variants(parent: ParentModel, *, repo: Path, work: Path, with_students: bool,
                   bar: tqdm) -> tuple[list[Variant], dict[str, float], HeldOut]:
    heldout = load_heldout(parent)
    ref = fp32_outputs(parent, heldout) if BUDGETS[parent.name].metric == "cosine_to_fp32" else None
    fp32 = evaluate(parent, parent.onnx_path, heldout, reference=ref)
    rows = [Variant("fp32", parent.onnx_path, fp32)]
    bar.set_postfix_str(f"{parent.name}: int8")
    rows.append(_int8(parent, heldout, work=work, fp32=fp32, ref=ref))
    bar.set_postfix_str(f"{parent.name}: fp16")
    rows.append(_fp16(parent, heldout, work=work, ref=ref))
    if with_students:
        bar.set_postfix_str(f"{parent.name}: student")
        rows += _students(parent, heldout, repo=repo, work=work, fp32=fp32, ref=ref)
    else:
        rows += [Variant(n, None, status="not built", notes="--no-students") for n in ("student", "student-int8")]
    return rows, fp32, heldout


def _row(parent: ParentModel, v: Variant, *, fp32: dict[str, float], latency: dict[str, dict[int, float]]) -> dict:
    metric = BUDGETS[parent.name].metric
    row: dict[str, Any] = {"variant": v.name, "status": v.status, "notes": v.notes, "metric": metric,
                           "published": False}
    if v.path is not None:
        row["size_mb"] = file_size_mb(v.path)
    if v.name in latency:
        row["p50_ms_b1"], row["p50_ms_b32"] = latency[v.name][1], latency[v.name][32]
        row["x_fp32_b32"] = latency[v.name][32] / latency["fp32"][32]
    if v.metrics is not None:
        verdict = check_budget(model=parent.name, variant_metrics=v.metrics, fp32_metrics=fp32)
        row.update(value=verdict.value, delta=verdict.delta, budget=verdict.budget,
                   within_budget=verdict.ok if v.name != "fp32" else None, verdict=verdict.as_dict(),
                   metrics=v.metrics)
    return row


def optimize_model(parent: ParentModel, *, args: argparse.Namespace, work: Path, bar: tqdm) -> dict[str, Path]:
    rows, fp32, heldout = build_variants(parent, repo=args.model_repository, work=work,
                                         with_students=not args.no_students, bar=bar)
    timed = {v.name: v.path for v in rows if v.path is not None}
    bar.set_postfix_str(f"{parent.name}: latency")
    feeds = {1: heldout.batch(1), 32: heldout.batch(32)}
    latency = measure_latency(timed, feeds=feeds, repeats=args.repeats, threads=args.threads)
    table = [_row(parent, v, fp32=fp32, latency=latency) for v in rows]
    for v, row in zip(rows, table):
        if args.publish and v.name != "fp32" and v.path is not None and v.metrics is not None:
            card = {"latency_ms_p50": latency.get(v.name), **v.card}
            row["published"] = publish_if_within_budget(
                repo_dir=args.model_repository, parent=parent, variant=v.name, onnx_path=v.path,
                metrics=v.metrics, fp32_metrics=fp32, card_extra=card) is not None
    about = {"repository": str(args.model_repository), "profile": parent.profile, "seed": parent.seed,
             "held_out": f"{sum(len(next(iter(f.values()))) for f in heldout.feeds)} examples",
             "latency": f"p50 of {args.repeats} interleaved rounds, ORT CPU, {args.threads} intra-op thread(s)",
             "budget": BUDGETS[parent.name].describe()}
    return report.write(parent.name, table, out_dir=args.output, about=about)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelserve optimize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--families", default=",".join(FAMILY_MODELS),
                        help=f"comma-separated subset of {','.join(FAMILY_MODELS)}")
    parser.add_argument("--output", type=Path, default=None, help="report folder (default <repo>/optimization)")
    parser.add_argument("--publish", action="store_true", help="publish variants within budget")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per variant and batch size")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads while timing")
    parser.add_argument("--no-students", action="store_true", help="skip distillation (rows say 'not built')")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILY_MODELS]
    if unknown or not families:
        parser.error(f"--families {args.families!r}: expected a comma-separated subset of {','.join(FAMILY_MODELS)}")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    args.families = families
    args.output = args.output or args.model_repository / "optimization"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    names = [m for f in args.families for m in FAMILY_MODELS[f]]
    parents = [load_parent(args.model_repository, m) for m in names]  # fail fast on a missing model
    written: dict[str, dict[str, Path]] = {}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        with tqdm(parents, desc="optimize", unit="model", file=sys.stderr) as bar:
            for parent in bar:
                written[parent.name] = optimize_model(parent, args=args, work=Path(tmp) / parent.name, bar=bar)
    for name, paths in written.items():
        print(f"{name}: {paths['md']}")
        print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
