"""Writes the optimization report of one model: a markdown table, the same rows as JSON, and a PNG plot
of held-out accuracy metric against batch-32 latency; and the summary of an output folder (every variant
of every family, ``export.report_rows.SUMMARY_FIELDS``) with a Pareto plot per family (``export.pareto``).

    python -m export.report DIR   # rewrite DIR's summary from the <model>.json reports in it
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from export import pareto
from export.report_rows import SUMMARY_FIELDS
from models.zoo import FAMILY_MODELS

# Latency targets of issue 4: INT8 at most this fraction of FP32's batch-32 p50 latency.
LATENCY_TARGETS = {"cnn": 0.6, "speech": 0.6, "transformer": 0.6}

# speedup_bN: FP32's p50 / the variant's at batch N, on the device the gate used (timed_on); ratio_ci_bN: the
# variant/FP32 latency ratio, median of per-round pairs [95% bootstrap CI] (export.int8_measure); kernels:
# the Conv/MatMul op types ORT's profiler saw run; why: the publish gate's reason (export.gate).
COLUMNS = ("variant", "status", "size_mb", "p50_ms_b1", "p50_ms_b32", "speedup_b1", "speedup_b32",
           "ratio_ci_b1", "ratio_ci_b32", "kernels", "timed_on",
           "metric", "value", "delta", "budget", "within_budget", "target_device", "published", "why", "notes")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def target_line(model: str, rows: list[dict[str, Any]]) -> str:
    target = LATENCY_TARGETS.get(model)
    int8 = next((r for r in rows if r["variant"] == "int8"), None)
    if target is None or int8 is None or int8.get("x_fp32_b32") is None:
        return ""
    reached = int8["x_fp32_b32"] <= target
    return (f"Target: INT8 at most {target}x FP32 p50 latency at batch 32 — measured "
            f"{int8['x_fp32_b32']:.2f}x: {'reached' if reached else 'NOT reached'}.")


def markdown(model: str, rows: list[dict[str, Any]], *, about: dict[str, Any]) -> str:
    lines = [f"# Optimization report: {model}", ""]
    lines += [f"- {k}: {v}" for k, v in about.items()]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
    line = target_line(model, rows)
    return "\n".join(lines + (["", line] if line else [])) + "\n"


def plot(model: str, rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row.get("p50_ms_b32") is None or row.get("value") is None:
            continue
        marker = "*" if row["variant"] == "fp32" else ("o" if row.get("within_budget") else "x")
        ax.scatter(row["p50_ms_b32"], row["value"], marker=marker, s=60)
        ax.annotate(row["variant"], (row["p50_ms_b32"], row["value"]), textcoords="offset points", xytext=(5, 5))
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    ax.set_xlabel("p50 latency at batch 32 (ms, this CPU)")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(f"{model}: accuracy vs latency (* FP32, o within budget, x over)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(model: str, rows: list[dict[str, Any]], *, out_dir: Path, about: dict[str, Any]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{model}.md", "json": out_dir / f"{model}.json", "png": out_dir / f"{model}.png"}
    paths["md"].write_text(markdown(model, rows, about=about))
    paths["json"].write_text(json.dumps({"model": model, "about": about, "rows": rows,
                                         "target": target_line(model, rows)}, indent=2, default=str))
    plot(model, rows, paths["png"])
    return paths


SUMMARY_FILES = {"md": "summary.md", "json": "summary.json"}
# Structured forms kept in summary.json beside the table's text fields.
DETAIL_KEYS = ("latency_ci", "ratio_ci", "within_budget", "status", "kernels", "timed_on")


def summary_markdown(rows: list[dict[str, Any]], *, cpu: str, plots: list[Path]) -> str:
    """One table for all families: the ``export.report_rows.SUMMARY_FIELDS`` of every row, then their meaning."""
    columns = list(SUMMARY_FIELDS)
    lines = ["# Optimization summary: every variant of every family", "", f"- CPU: {cpu}",
             f"- Pareto plots (latency at batch 32 vs held-out metric): {', '.join(p.name for p in plots) or 'none'}",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), 4).replace("|", "/") for c in columns) + " |")
    lines += ["", "Fields:", ""] + [f"- `{name}`: {meaning}" for name, meaning in SUMMARY_FIELDS.items()]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path) -> dict[str, Any]:
    """``summary.md`` / ``summary.json`` and ``<family>-pareto.png`` from the per-model reports in ``out_dir``
    (written by this run or earlier ones, so families optimized in separate runs end up in one table)."""
    reports = [json.loads(out_dir.joinpath(f"{model}.json").read_text())
               for models in FAMILY_MODELS.values() for model in models if out_dir.joinpath(f"{model}.json").is_file()]
    by_family: dict[str, dict[str, list[dict[str, Any]]]] = {}
    rows = []
    for rep in reports:
        family = next((f for f, models in FAMILY_MODELS.items() if rep["model"] in models), rep["model"])
        for row in rep["rows"]:
            row = {"family": family, "model": rep["model"], **row}
            rows.append(row)
            by_family.setdefault(family, {}).setdefault(rep["model"], []).append(row)
    plots = [pareto.plot_family(family, models, out_dir / f"{family}-pareto.png")
             for family, models in by_family.items()]
    cpu = next((rep["about"].get("cpu_isa", "") for rep in reports), "")
    paths = {kind: out_dir / name for kind, name in SUMMARY_FILES.items()}
    paths["md"].write_text(summary_markdown(rows, cpu=cpu, plots=plots))
    paths["json"].write_text(json.dumps({"cpu": cpu, "fields": SUMMARY_FIELDS, "plots": [p.name for p in plots],
                                         "rows": [{k: r.get(k) for k in (*SUMMARY_FIELDS, *DETAIL_KEYS)} for r in rows]},
                                        indent=2, default=str))
    return {**paths, "plots": plots}


def main(argv: list[str] | None = None) -> int:
    """``python -m export.report DIR``: rewrite DIR's summary and Pareto plots from its per-model reports
    (e.g. after optimizing families in separate runs into separate folders and copying their JSON together)."""
    parser = argparse.ArgumentParser(prog="python -m export.report", description=main.__doc__)
    parser.add_argument("output", type=Path, help="an optimize output folder holding <model>.json reports")
    args = parser.parse_args(argv)
    if not any(args.output.joinpath(f"{m}.json").is_file() for ms in FAMILY_MODELS.values() for m in ms):
        parser.error(f"{args.output}: expected <model>.json reports of `modelserve optimize` "
                     f"(models {', '.join(m for ms in FAMILY_MODELS.values() for m in ms)})")
    paths = write_summary(args.output)
    print(f"{paths['md']}, {paths['json']}, {', '.join(str(p) for p in paths['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
