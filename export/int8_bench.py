"""FP32 vs INT8 on this CPU, measured honestly: ``python -m export.int8_bench --model-repository ZOO``.

Per model (cnn, speech): the static INT8 layout is picked by measurement (export.quant_grid), the INT8
variant built as ``modelserve optimize`` builds it (export.quantize), then FP32 and INT8 are timed
interleaved, round by round, at batch 1 and 32 with ORT's intra-op threads fixed at each of ``--threads``.
Each cell is the median INT8/FP32 latency ratio with its 95% bootstrap CI; the kernels ORT's profiler saw
and the CPU's ISA flags are printed with it. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from export import quant_grid, quantize
from export.common import BUDGETS, latency_samples, load_parent, p50
from export.gate import GATE_BATCHES
from export.heldout import evaluate, fp32_outputs, load_heldout
from export.int8_measure import cpu_isa, isa_text, kernel_counts, kernels_text, ratio_cis


def bench_model(repo: Path, name: str, *, threads: list[int], repeats: int, work: Path) -> dict[str, Any]:
    parent = load_parent(repo, name)
    heldout = load_heldout(parent)
    ref = fp32_outputs(parent, heldout) if BUDGETS[name].metric == "cosine_to_fp32" else None
    fp32 = evaluate(parent, parent.onnx_path, heldout, reference=ref)
    config, grid = quant_grid.choose_config(parent, heldout, work_dir=work / "grid", fp32_metrics=fp32,
                                            reference=ref, threads=threads[0])
    result = quantize.quantize(parent, heldout, work_dir=work / "int8", fp32_metrics=fp32, reference=ref,
                               config=config)
    feeds = {b: heldout.batch(b) for b in GATE_BATCHES}
    runs = []
    for count in threads:
        samples = latency_samples({"fp32": parent.onnx_path, "int8": result.path}, feeds=feeds, repeats=repeats,
                                  threads=count)
        cis, medians = ratio_cis(samples)["int8"], p50(samples)
        runs.append({"threads": count, "p50_ms": medians, "ratio_ci": {b: ci.as_dict() for b, ci in cis.items()},
                     "ratio_text": {b: ci.text() for b, ci in cis.items()}})
    return {"model": name, "layout": config.label(), "method": result.method, "within_budget": result.verdict.ok,
            "metric": result.verdict.as_dict(), "grid": grid, "runs": runs,
            "kernels": {"fp32": kernel_counts(parent.onnx_path, feeds[1]),
                        "int8": kernel_counts(result.path, feeds[1])}}


def markdown(results: list[dict[str, Any]], *, isa: str, repeats: int) -> str:
    lines = [f"CPU: {isa}", f"{repeats} interleaved rounds per cell; INT8/FP32 latency ratio, median "
             "[95% bootstrap CI] (below 1: INT8 faster)", "",
             "| model | INT8 layout (measured) | threads | p50 FP32 b1 / b32 ms | p50 INT8 b1 / b32 ms | ratio b1 | "
             "ratio b32 | kernels FP32 | kernels INT8 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for run in r["runs"]:
            f, q = run["p50_ms"]["fp32"], run["p50_ms"]["int8"]
            lines.append(f"| {r['model']} | {r['layout']}, {r['method']} | {run['threads']} | {f[1]:.3g} / "
                         f"{f[32]:.3g} | {q[1]:.3g} / {q[32]:.3g} | {run['ratio_text'][1]} | {run['ratio_text'][32]} "
                         f"| {kernels_text(r['kernels']['fp32'])} | {kernels_text(r['kernels']['int8'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.int8_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", default=",".join(quantize.STATIC_MODELS), help="comma-separated: cnn,speech")
    parser.add_argument("--threads", default="1,2", help="ORT intra-op thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved rounds per thread count")
    parser.add_argument("--out", type=Path, default=Path("int8_bench"), help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(m not in quantize.STATIC_MODELS for m in names):
        parser.error(f"--models {args.models!r}: expected a comma-separated subset of {','.join(quantize.STATIC_MODELS)}")
    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1 or args.repeats < 2:
        parser.error(f"--threads {args.threads!r} / --repeats {args.repeats}: expected positive thread counts and "
                     "at least 2 rounds")
    isa = cpu_isa()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(args.model_repository, m, threads=threads, repeats=args.repeats, work=Path(tmp) / m)
                   for m in names]
    text = markdown(results, isa=isa_text(isa), repeats=args.repeats)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"isa": isa, "results": results}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
