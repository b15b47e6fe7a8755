"""Numbers from a run: client throughput and latency percentiles, plus the server's own statistics delta.

The statistics extension (Triton's shape) tells where the server spent a request's time: queued waiting
for a batch vs computing. Client latency minus the server's success time is transport + HTTP + codec.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from loadtests.generator import LevelResult

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def _totals(doc: dict | None) -> dict[str, int] | None:
    """Counters summed over the versions in a statistics document."""
    if not doc or not doc.get("model_stats"):
        return None
    out: dict[str, int] = {"inference_count": 0, "execution_count": 0}
    for ms in doc["model_stats"]:
        out["inference_count"] += int(ms.get("inference_count", 0))
        out["execution_count"] += int(ms.get("execution_count", 0))
        stats = ms.get("inference_stats", {})
        for name in _DURATIONS:
            d = stats.get(name, {})
            out[f"{name}_count"] = out.get(f"{name}_count", 0) + int(d.get("count", 0))
            out[f"{name}_ns"] = out.get(f"{name}_ns", 0) + int(d.get("ns", 0))
    return out


def _mean_ms(delta: dict[str, int], name: str) -> float | None:
    count = delta.get(f"{name}_count", 0)
    return delta[f"{name}_ns"] / count / 1e6 if count else None


def stats_delta(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """What the server counted during the run, and the per-request means derived from it."""
    a, b = _totals(before), _totals(after)
    if a is None or b is None:
        return None
    delta = {k: b[k] - a.get(k, 0) for k in b}
    executions = delta["execution_count"]
    return {
        "counts": delta,
        "mean_batch_size": delta["inference_count"] / executions if executions else None,
        # Triton attributes a batch's compute to every request in it, so these are per-request means.
        "queue_ms": _mean_ms(delta, "queue"),
        "compute_ms": sum(_mean_ms(delta, n) or 0.0 for n in ("compute_input", "compute_infer", "compute_output"))
        if delta.get("compute_infer_count") else None,
        "compute_infer_ms": _mean_ms(delta, "compute_infer"),
        "server_ms": _mean_ms(delta, "success"),
    }


def summarize(result: LevelResult) -> dict[str, Any]:
    lat = np.asarray(result.latencies_s) * 1e3
    pct = dict(zip(("p50_ms", "p90_ms", "p99_ms"), np.percentile(lat, [50, 90, 99]).tolist())) if lat.size else {}
    elapsed = result.elapsed_s or float("nan")
    return {
        "protocol": result.protocol,
        "concurrency": result.concurrency,
        "requested": result.requested,
        "ok": result.ok,
        "errors": sum(result.errors.values()),
        "errors_by_kind": dict(result.errors),
        "warmup_errors": sum(result.warmup_errors.values()),
        "error_samples": result.error_samples,
        "time_capped": result.time_capped,
        "elapsed_s": result.elapsed_s,
        "requests_per_s": result.ok / elapsed,
        "rows_per_s": result.ok * result.rows_per_request / elapsed,
        "mean_ms": float(lat.mean()) if lat.size else None,
        **{k: pct.get(k) for k in ("p50_ms", "p90_ms", "p99_ms")},
        # Client CPU per wall second (100 = one core): the share of the box the generator itself took.
        "client_cpu_pct": 100 * result.client_cpu_s / elapsed,
        **{f"{name}_cpu_pct": 100 * cpu / elapsed for name, cpu in result.probe_cpu_s.items()},
        "server": stats_delta(result.stats_before, result.stats_after),
    }


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render_table(rows: list[dict[str, Any]], *, title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("protocol", "conc", "ok", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms",
                "mean batch", "queue ms", "compute ms", "server ms", "client CPU %"):
        table.add_column(col, justify="left" if col == "protocol" else "right")
    for r in rows:
        server = r["server"] or {}
        table.add_row(
            r["protocol"], str(r["concurrency"]), str(r["ok"]),
            f"[red]{r['errors']}[/red]" if r["errors"] else "0",
            fmt(r["requests_per_s"], ".0f"), fmt(r["p50_ms"]), fmt(r["p90_ms"]), fmt(r["p99_ms"]),
            fmt(server.get("mean_batch_size")), fmt(server.get("queue_ms"), ".3f"),
            fmt(server.get("compute_ms"), ".3f"), fmt(server.get("server_ms"), ".3f"), fmt(r["client_cpu_pct"], ".0f"),
        )
    # Piped output (make, CI logs) would otherwise be cut to 80 columns and truncate every number.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for r in rows:
        if r["warmup_errors"]:
            console.print(f"[red]{r['protocol']} c={r['concurrency']}: {r['warmup_errors']} warm-up error(s)[/red]")
        if r["errors"]:
            console.print(f"[red]{r['protocol']} c={r['concurrency']}: {r['errors']} error(s) {r['errors_by_kind']}[/red]")
            for sample in r["error_samples"]:
                console.print(f"  {sample}")
        if r["time_capped"]:
            console.print(f"[yellow]{r['protocol']} c={r['concurrency']}: stopped at the time cap after {r['ok']} "
                          f"of {r['requested']} requests[/yellow]")


def write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
