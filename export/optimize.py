"""``modelserve optimize``: INT8, FP16 and distilled variants of the zoo, measured and reported.

    modelserve optimize [--model-repository DIR] [--families cnn,transformer,speech,recommender]
                        [--output DIR] [--publish]

Per model: FP32, INT8, FP16, student and student+INT8 rows (file size, p50 latency at batch 1 and 32
measured side by side in one interleaved run on this CPU, held-out metric, delta vs FP32, budget
verdict, and whether the publish gate (export.gate) lets it through, with why), written as markdown,
JSON and a PNG plot; then ``summary.md`` / ``summary.json``, one row per variant of every family reported in
the output folder (format/layout, ISA features used, latency CIs, ratio to FP32, accuracy delta, size,
published or not and why: export.report_rows) and a Pareto plot per family, ``<family>-pareto.png``.
``--publish`` adds the variants the gate passes to the repository as
``<model>-<variant>``: within budget AND faster than FP32 on the device they are made for.
Library output (quantizer logging, warnings, training bars) goes to ``<output>/optimize.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import Progress

from export import fp16, quant_grid, quantize, report, report_rows
from export.common import (
    BUDGETS,
    FAMILY_MODELS,
    STUDENT_BUDGETS,
    ParentModel,
    check_budget,
    file_size_mb,
    latency_samples,
    load_parent,
    p50,
    publish_variant,
)
from export.gate import GATE_BATCHES, MIN_SPEEDUP, TARGET_DEVICE, Decision, Device, decide, detect_device
from export.heldout import HeldOut, evaluate, fp32_outputs, load_heldout
from export.int8_measure import RatioCI, cpu_isa, isa_text, kernel_counts, kernels_text, ratio_cis
from models.runlog import WeightedEta, format_seconds, progress, quiet_to_log
from service.modelrepo.card import variant_name

LOG_FILE = "optimize.log"
# Estimated seconds per step on 2 cores: (base, per MB of the FP32 graph). Rough, from the default
# zoo's 22-minute run dominated by the 91 MB MiniLM; the ETA rescales them as steps finish, and
# optimize.log records every step's measured seconds next to its estimate to refit them.
STEP_COST = {"held-out data": (3.0, 0.3), "int8": (5.0, 1.5), "fp16": (2.0, 0.5), "student": (20.0, 4.0),
             "latency": (0.01, 0.01)}


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
          name: str = "int8", threads: int = 1) -> Variant:
    config, grid = quantize.DEFAULT_CONFIG, list[dict[str, Any]]()
    if parent.name in quantize.STATIC_MODELS:  # the layout is measured on this CPU (export.quant_grid)
        config, grid = quant_grid.choose_config(parent, heldout, work_dir=work / f"{name}-grid", fp32_metrics=fp32,
                                                reference=ref, threads=threads)
    result = quantize.quantize(parent, heldout, work_dir=work / name, fp32_metrics=fp32, reference=ref,
                               config=config)
    kept = ", ".join(result.kept_fp32) or "nothing"
    layout = f"{config.label()} (measured)" if grid else "dynamic"
    return Variant(name, result.path, result.metrics,
                   notes=f"{result.method}, {layout}; kept FP32: {kept}; "
                         f"int ops {quantize.integer_op_counts(result.path)}",
                   card={"method": result.method, "layout": layout, "layout_grid": grid,
                         "kept_fp32": result.kept_fp32, "attempts": result.attempts})


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
    served = student.details.get("served", {}).get("paths", {}).get("student-int8")
    if served:  # the sentence encoder's INT8 student: the very graph its publication rule judged
        q = Variant("student-int8", Path(served), evaluate(parent, Path(served), heldout, reference=ref),
                    notes="student, INT8 dynamic (per-channel, no FP32 fallback)",
                    card={"method": "dynamic", "layout": "dynamic", "kept_fp32": []})
    else:
        as_parent = dataclasses.replace(parent, onnx_path=Path(student.onnx_path))
        q = _int8(as_parent, heldout, work=work, fp32=fp32, ref=ref, name="student-int8")
    q.card.update({"parameters": student.parameters})
    return [*rows, q]


class Steps:
    """The progress display of the whole run: each (model, step) weighs its expected seconds."""

    def __init__(self, bar: Progress, expected: dict[str, float]) -> None:
        self.bar, self.eta = bar, WeightedEta(expected)
        self.current: str | None = None
        self.since = time.perf_counter()
        self.task = bar.add_task("optimize", total=self.eta.total(), step="", eta=self._left)

    def _left(self) -> float:
        return self.eta.remaining(current=self.current, current_elapsed=time.perf_counter() - self.since)

    @contextlib.contextmanager
    def step(self, key: str) -> Iterator[None]:
        self.current, self.since = key, time.perf_counter()
        self.bar.update(self.task, step=key)
        try:
            yield
        finally:
            seconds = time.perf_counter() - self.since
            self.eta.finish(key, seconds)
            self.current = None
            self.bar.advance(self.task, self.eta.expected[key])
            logging.getLogger("modelserve.optimize").info("%s: %.1f s (estimated %.1f s)", key, seconds,
                                                          self.eta.expected[key])


def expected_seconds(parent: ParentModel, *, repeats: int, students: bool) -> dict[str, float]:
    """Estimated seconds per step from the graph's size (see STEP_COST); the ETA rescales them."""
    mb = file_size_mb(parent.onnx_path)
    variants = 5 if students else 3
    cost = {step: base + per_mb * mb for step, (base, per_mb) in STEP_COST.items()}
    if parent.name in quantize.STATIC_MODELS:
        cost["int8"] *= 3 + len(quant_grid.GRID)  # the measured layout grid, then three calibration methods
    if parent.family == "speech":
        cost["held-out data"] += 30.0  # the eSpeak corpus is re-synthesized (or read from its cache)
    if parent.name == "transformer":
        cost["student"] += 3000.0  # distill_text: teacher cache + 2.2 epochs over 18,000 texts, ~1 h on 2 shared cores
    cost["latency"] *= (repeats + 2) * variants
    if not students:
        del cost["student"]
    return {f"{parent.name}: {step}": seconds for step, seconds in cost.items()}


def build_variants(parent: ParentModel, *, repo: Path, work: Path, with_students: bool,
                   steps: Steps, threads: int = 1) -> tuple[list[Variant], dict[str, float], HeldOut]:
    with steps.step(f"{parent.name}: held-out data"):
        heldout = load_heldout(parent)
        ref = fp32_outputs(parent, heldout) if BUDGETS[parent.name].metric == "cosine_to_fp32" else None
        fp32 = evaluate(parent, parent.onnx_path, heldout, reference=ref)
    rows = [Variant("fp32", parent.onnx_path, fp32)]
    with steps.step(f"{parent.name}: int8"):
        rows.append(_int8(parent, heldout, work=work, fp32=fp32, ref=ref, threads=threads))
    with steps.step(f"{parent.name}: fp16"):
        rows.append(_fp16(parent, heldout, work=work, ref=ref))
    if with_students:
        with steps.step(f"{parent.name}: student"):
            rows += _students(parent, heldout, repo=repo, work=work, fp32=fp32, ref=ref)
    else:
        rows += [Variant(n, None, status="not built", notes="--no-students") for n in ("student", "student-int8")]
    return rows, fp32, heldout


@dataclasses.dataclass
class Timing:
    """p50 ms per device ("CPU"/"GPU"), variant and batch size, and each variant's latency-ratio CI vs FP32."""

    p50: dict[str, dict[str, dict[int, float]]]
    ci: dict[str, dict[str, dict[int, RatioCI]]]
    # p50 ms with its bootstrap CI per device, variant and batch size (export.report_rows.latency_cis)
    latency_ci: dict[str, dict[str, dict[int, RatioCI]]] = dataclasses.field(default_factory=dict)


def time_variants(rows: list[Variant], *, heldout: HeldOut, args: argparse.Namespace, device: Device) -> Timing:
    """Latency measured side by side: all on CPU, and FP32 vs FP16 on the GPU providers when there are any
    (FP16's target). Each round pairs every variant with FP32, so ratios get a bootstrap CI."""
    feeds = {b: heldout.batch(b) for b in GATE_BATCHES}
    timed = {v.name: v.path for v in rows if v.path is not None}
    samples = {"CPU": latency_samples(timed, feeds=feeds, repeats=args.repeats, threads=args.threads)}
    if device.has_gpu and "fp16" in timed:
        gpu = {n: timed[n] for n in ("fp32", "fp16")}
        samples["GPU"] = latency_samples(gpu, feeds=feeds, repeats=args.repeats, threads=args.threads,
                                         providers=device.providers)
    enough = args.repeats >= 2
    return Timing({on: p50(s) for on, s in samples.items()},
                  {on: ratio_cis(s) if enough else {} for on, s in samples.items()},
                  {on: report_rows.latency_cis(s) for on, s in samples.items()})


def _row(parent: ParentModel, v: Variant, *, fp32: dict[str, float], timing: Timing, device: Device,
         kernels: dict[str, int] | None) -> tuple[dict[str, Any], Decision]:
    latency = timing.p50
    metric = BUDGETS[parent.name].metric
    row: dict[str, Any] = {"variant": v.name, "status": v.status, "notes": v.notes, "metric": metric,
                           "published": False}
    if v.path is not None:
        row["size_mb"] = file_size_mb(v.path)
    cpu = latency["CPU"]
    if v.name in cpu:
        row["p50_ms_b1"], row["p50_ms_b32"] = cpu[v.name][1], cpu[v.name][32]
        row["x_fp32_b32"] = cpu[v.name][32] / cpu["fp32"][32]
    verdict = None
    if v.metrics is not None:
        # Speed-ups at the gate's batch sizes (CPU, side by side) join the metrics: a student's budget may
        # set one (export.common.STUDENT_BUDGETS); other budgets ignore them.
        speed = {f"speedup_b{b}": cpu["fp32"][b] / cpu[v.name][b] for b in GATE_BATCHES
                 if v.name in cpu and b in cpu[v.name] and b in cpu.get("fp32", {})}
        verdict = check_budget(model=parent.name, variant=v.name, variant_metrics={**v.metrics, **speed},
                               fp32_metrics=fp32)
        row.update(value=verdict.value, delta=verdict.delta, budget=verdict.budget,
                   within_budget=verdict.ok if v.name != "fp32" else None, verdict=verdict.as_dict(),
                   metrics=v.metrics)
    timed_on = "GPU" if TARGET_DEVICE.get(v.name) == "GPU" and "GPU" in latency else "CPU"
    cis = timing.ci.get(timed_on, {}).get(v.name)
    if cis:
        row["ratio_ci"] = {str(b): ci.as_dict() for b, ci in cis.items()}
        row.update({f"ratio_ci_b{b}": ci.text() for b, ci in cis.items()})
    if kernels is not None:
        row["kernel_counts"], row["kernels"] = kernels, kernels_text(kernels)
    if v.name == "fp32":
        decision = Decision(False, "the parent (already published)", "CPU")
    else:
        decision = decide(variant=v.name, verdict=verdict if v.path is not None else None,
                          latency=latency[timed_on].get(v.name), parent_latency=latency[timed_on].get("fp32"),
                          timed_on=timed_on, device=device, ratio_ci=cis)
    row.update(target_device=decision.target_device, timed_on=timed_on, gate=decision.as_dict(), why=decision.why,
               **{f"speedup_b{b}": s for b, s in decision.speedup.items()})
    return row, decision


def optimize_model(parent: ParentModel, *, args: argparse.Namespace, work: Path, steps: Steps,
                   device: Device) -> tuple[dict[str, Path], list[str]]:
    """Build, evaluate, time and gate every variant of ``parent``; publish what passes when --publish.
    Returns the report paths and the names published."""
    rows, fp32, heldout = build_variants(parent, repo=args.model_repository, work=work,
                                         with_students=not args.no_students, steps=steps, threads=args.threads)
    with steps.step(f"{parent.name}: latency"):
        timing = time_variants(rows, heldout=heldout, args=args, device=device)
    latency = timing.p50
    table, published = [], []
    isa = cpu_isa()
    for v in rows:
        kernels = kernel_counts(v.path, heldout.batch(1), threads=args.threads) if v.path is not None else None
        row, decision = _row(parent, v, fp32=fp32, timing=timing, device=device, kernels=kernels)
        row.update(report_rows.summary_fields(family=parent.family, model=parent.name, variant=v.name, card=v.card,
                                              kernels=kernels, isa=isa, built=v.path is not None,
                                              latency=timing.latency_ci.get(row["timed_on"], {}).get(v.name)))
        if decision.publish and not args.publish:
            row["why"] = decision.why.replace("published:", "would be published (without --publish):", 1)
        elif decision.publish and v.path is not None and v.metrics is not None:
            card = {"metrics": v.metrics, "fp32_metrics": fp32, "budget": row["verdict"], "kept_fp32": [],
                    "latency_ms_p50": {on: lat.get(v.name) for on, lat in latency.items()},
                    "gate": decision.as_dict(), "device": device.describe(), **v.card}
            publish_variant(repo_dir=args.model_repository, parent=parent, variant=v.name, onnx_path=v.path,
                            card_extra=card)
            row["published"] = True
            published.append(variant_name(parent.name, v.name))
        table.append(row)
    about = {"repository": str(args.model_repository), "profile": parent.profile, "seed": parent.seed,
             "held_out": f"{sum(len(next(iter(f.values()))) for f in heldout.feeds)} examples",
             "latency": f"p50 of {args.repeats} interleaved rounds, ORT, {args.threads} intra-op thread(s)",
             "latency_ci": "variant/FP32 latency ratio: median of per-round pairs [95% bootstrap CI]",
             "cpu_isa": isa_text(isa),
             "device": device.describe(), "budget": BUDGETS[parent.name].describe(),
             **({"student_budget": STUDENT_BUDGETS[parent.name].describe()} if parent.name in STUDENT_BUDGETS else {}),
             "gate": f"published only if within budget and >= {MIN_SPEEDUP:g}x faster than FP32 at batch "
                     f"{' and '.join(map(str, GATE_BATCHES))} on its target device"}
    if parent.name == "recommender":
        about["metric"] = ("hr@10 / ndcg@10: the model card's NCF protocol (held-out item among 99 sampled "
                           "unseen items); hr@10_full: among all unseen items (stricter)")
    return report.write(parent.name, table, out_dir=args.output, about=about), published


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelserve optimize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--families", default=",".join(FAMILY_MODELS),
                        help=f"comma-separated subset of {','.join(FAMILY_MODELS)}")
    parser.add_argument("--output", type=Path, default=None, help="report folder (default <repo>/optimization)")
    parser.add_argument("--publish", action="store_true",
                        help="publish the variants the gate passes (within budget and faster than FP32)")
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


def closing_line(published: list[str], *, dry_run: bool) -> str:
    """The command's last line: what was published and how a running server gets it."""
    if dry_run:
        return "nothing published (dry run): pass --publish to publish what the gate lets through"
    if not published:
        return "published nothing: no variant passed the gate (each report row says why)"
    names = ", ".join(published)
    return (f"published {names}; a server in poll mode picks them up within --repository-poll-secs; otherwise "
            f"restart it or POST /v2/repository/models/{published[0]}/load (each name) in explicit mode")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [m for f in args.families for m in FAMILY_MODELS[f]]
    parents = [load_parent(args.model_repository, m) for m in names]  # fail fast on a missing model
    device = detect_device()
    expected = {k: v for p in parents
                for k, v in expected_seconds(p, repeats=args.repeats, students=not args.no_students).items()}
    written: dict[str, dict[str, Path]] = {}
    published: list[str] = []
    log_path = args.output / LOG_FILE
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp, quiet_to_log(log_path) as console:
        console.print(f"optimizing {', '.join(names)} on {device.describe()}: about "
                      f"{format_seconds(sum(expected.values()))} (estimated from model sizes; the ETA adjusts "
                      f"as steps finish). Library output: {log_path}")
        with progress(console) as bar:
            steps = Steps(bar, expected)
            for parent in parents:
                written[parent.name], done = optimize_model(parent, args=args, work=Path(tmp) / parent.name,
                                                            steps=steps, device=device)
                published += done
    for name, paths in written.items():
        print(f"{name}: {paths['md']}")
        print(paths["md"].read_text())
    summary = report.write_summary(args.output)
    print(f"all families: {summary['md']} (Pareto plots: {', '.join(str(p) for p in summary['plots'])})")
    print(closing_line(published, dry_run=not args.publish))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
