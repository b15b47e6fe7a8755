"""The bench's one table (rich on the console, Markdown on disk): ceilings, serving cells, text, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtests.report import fmt

COLUMNS = ("section", "model", "batching / input", "protocol", "client", "conc", "rows/s", "ceiling rows/s", "ratio",
           "p50 ms", "p50 - b1 ms", "p99 ms", "mean batch", "server CPU-us/req", "client CPU-us/req", "others CPU %",
           "errors")


def _ceiling_cells(name: str, ceiling: dict[str, Any]) -> list[str]:
    best = ceiling["best"]
    return ["ceiling", name, f"best batch {best['batch']} (b1 {ceiling['points'][0]['latency_ms']:.3f} ms)",
            "in-process", "-", "-", fmt(best["rows_per_s"], ".0f"), fmt(best["rows_per_s"], ".0f"), "1.00", "-", "-",
            "-", str(best["batch"]), "-", "-", fmt(ceiling.get("others_cpu_pct"), ".0f"), "0"]


def _serve_cells(row: dict[str, Any]) -> list[str]:
    server = row["server"] or {}
    return ["serve", row["cnn"], row["batching"], row["protocol"], row.get("client", "python"),
            str(row["concurrency"]), fmt(row["rows_per_s"], ".0f"), fmt(row.get("ceiling_rows_per_s"), ".0f"),
            fmt(row.get("ratio")), fmt(row["p50_ms"]), fmt(row.get("p50_minus_b1_ms")), fmt(row["p99_ms"]),
            fmt(server.get("mean_batch_size")), fmt(row.get("server_cpu_us_per_req"), ".0f"),
            fmt(row.get("client_cpu_us_per_req"), ".0f"), fmt(row.get("others_cpu_pct"), ".0f"),
            str(row["errors"] + row["warmup_errors"])]


def _text_cells(row: dict[str, Any]) -> list[str]:
    server = row.get("server") or {}
    return ["text", row["model"], "length-aware + adaptive" if row["model"] == "text_ragged" else "equal lengths only",
            "v1 predict", "python", str(row["concurrency"]), fmt(row["rows_per_s"], ".0f"),
            fmt(row.get("ceiling_rows_per_s"), ".0f"), fmt(row.get("ratio")), fmt(row["p50_ms"]), "-",
            fmt(row["p99_ms"]), fmt(server.get("mean_batch_size")), fmt(row.get("server_cpu_us_per_req"), ".0f"),
            "-", "-", "0"]


def _text_ceiling_cells(ceiling: dict[str, float]) -> list[list[str]]:
    sorted_rate = ceiling["sorted_by_length"]
    return [["ceiling", "transformer", f"{label} (batch {1 if key == 'batch1' else 8})", "in-process", "-", "-",
             fmt(rate, ".0f"), fmt(sorted_rate, ".0f"), fmt(rate / sorted_rate), "-", "-", "-", "-", "-", "-", "-",
             "0"]
            for key, label, rate in ((k, k.replace("_", " "), v) for k, v in ceiling.items())]


def _offline_cells(row: dict[str, Any]) -> list[str]:
    return ["offline", row["model"], row["input"], "predict", "-", "-", fmt(row["predict_rows_s"], ".0f"),
            fmt(row["ceiling_rows_s"], ".0f"), fmt(row["fraction"]), "-", "-", "-", str(row["batch_size"]), "-", "-",
            "-", "0"]


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = [_ceiling_cells(name, c) for name, c in doc.get("ceilings", {}).items()]
    rows += [_serve_cells(r) for r in doc.get("serve", [])]
    if doc.get("text_ceiling"):
        rows += _text_ceiling_cells(doc["text_ceiling"])
    rows += [_text_cells(r) for r in doc.get("text", [])]
    rows += [_offline_cells(r) for r in doc.get("offline", [])]
    return rows


def note(doc: dict[str, Any]) -> str:
    env, s = doc["environment"], doc["settings"]
    load = ", ".join(f"{v:.1f}" for v in env["loadavg"])
    after = ", ".join(f"{v:.1f}" for v in env.get("loadavg_after", env["loadavg"]))
    return (
        f"{env['cpus']} usable cores, onnxruntime {env['onnxruntime']}; load average {load} before, {after} after. "
        f"Serving cells: up to {s['requests']} requests or {s['time_cap_s']:g} s each, closed loop, 1 row per "
        f"request, 1 model instance; fixed = `max_queue_delay_microseconds: {s['delay_us']}`, adaptive = the same "
        "delay as an upper bound. ratio = rows/s over the in-process ceiling of the same model measured in this run "
        "(text: over the length-sorted batch-8 ceiling; offline: `modelserve predict` over ONNX Runtime alone on "
        "the same collated batches, text sorted by length). p50 - b1 = client p50 minus the in-process batch-1 "
        "latency. server CPU-us/req = the server process's CPU time (all threads, ONNX Runtime's included) over "
        "the requests answered; client CPU-us/req the same for the load generator. client: python = aiohttp "
        "(HTTP) / grpc.aio (gRPC), h2load = nghttp2's C generator (one body per cell; every answer counted on "
        "the server's side, loadtests/h2load.py). others CPU % = what the rest of the machine used meanwhile (of "
        f"{env['cpus']}00 %). The load generator shares the cores."
    )


def render(doc: dict[str, Any], *, console: Console) -> None:
    table = Table(title="modelserve bench")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in COLUMNS[:4] else "right")
    for cells in table_rows(doc):
        table.add_row(*cells)
    console.print(table)
    console.print(note(doc))


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(doc)]
    text = "\n\n".join(["# modelserve bench", "\n".join(lines), note(doc),
                        f"Bench took {doc['bench_seconds']:.0f} s."])
    path.write_text(text + "\n")
