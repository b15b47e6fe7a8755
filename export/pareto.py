"""Pareto plot of one family: p50 latency at batch 32 against the held-out metric, every variant of every
model of the family (one panel per model: the transformer family's two models have different metrics),
published variants filled, the others hollow, and the Pareto front (no other variant both faster and
more accurate) drawn through its points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LATENCY_KEY = "p50_ms_b32"


def points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that were both timed and scored."""
    return [r for r in rows if r.get(LATENCY_KEY) is not None and r.get("value") is not None]


def front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pareto-optimal rows (lower latency, higher metric), fastest first."""
    best: list[dict[str, Any]] = []
    for row in sorted(points(rows), key=lambda r: (r[LATENCY_KEY], -r["value"])):
        if not best or row["value"] > best[-1]["value"]:
            best.append(row)
    return best


def _panel(ax: Any, model: str, rows: list[dict[str, Any]]) -> None:
    for i, row in enumerate(points(rows)):
        x, y = row[LATENCY_KEY], row["value"]
        ci = (row.get("latency_ci") or {}).get("32")
        err = [[x - ci["low"]], [ci["high"] - x]] if ci else None
        color = "tab:blue" if row["variant"] == "fp32" else ("tab:green" if row.get("published") else "tab:red")
        ax.errorbar(x, y, xerr=err, fmt="*" if row["variant"] == "fp32" else "o", color=color, ms=9,
                    mfc=color if row.get("published") or row["variant"] == "fp32" else "none", capsize=3)
        # staggered labels: variants often sit on one spot (a student and its INT8 share an accuracy)
        ax.annotate(row["variant"], (x, y), textcoords="offset points", xytext=(5, 6 - 11 * (i % 3)), fontsize=8)
    best = front(rows)
    if len(best) > 1:
        ax.step([r[LATENCY_KEY] for r in best], [r["value"] for r in best], where="post", color="gray",
                alpha=0.6, label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    ax.set_xlabel("p50 latency at batch 32, ms (95% CI)")
    ax.set_ylabel(f"held-out {metric}")
    ax.set_title(model, fontsize=10)
    ax.grid(True, alpha=0.3)


def plot_family(family: str, models: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Write ``path`` (PNG): one panel per model of ``family`` (``models``: model -> report rows)."""
    import matplotlib  # NOTE: heavy, and only the train extra has it; only plotting needs it

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, (model, rows) in zip(axes[0], models.items()):
        _panel(ax, model, rows)
    fig.suptitle(f"{family}: accuracy vs latency (* FP32 parent, filled: published, hollow red: not)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
