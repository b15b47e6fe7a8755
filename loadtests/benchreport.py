"""The bench's outputs: one table (rich on the console, markdown on disk) and a throughput plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtests.report import fmt

COLUMNS = ("batching", "protocol", "conc", "rows/s", "% of ceiling", "p50 ms", "p99 ms", "mean batch",
           "queue ms", "compute ms", "compute ms/row", "server CPU %", "client CPU %", "others CPU %", "errors")
CEILING_COLUMNS = ("batch", "latency ms (median)", "rows/s")

CO_LOCATION_NOTE = (
    "The load generator and the server share the same {cpus} cores (and, on the dev box, other people's jobs): "
    "client CPU % is the generator's own use (100 = one core), server CPU % the server process's (all threads), "
    "others CPU % everything else the machine ran meanwhile (out of {cpus}00 %). "
    "The in-process ceiling ran alone (no client, no server), beside others' jobs taking {ceiling_others:.0f} %. "
    "Load average {load_before} before, {load_after} after."
)


def _per_row(server: dict[str, Any]) -> float | None:
    # compute ms is per request, and a batch's compute is attributed to each request in it (Triton's rule).
    if server.get("compute_ms") is None or not server.get("mean_batch_size"):
        return None
    return server["compute_ms"] / server["mean_batch_size"]


def _server_cells(row: dict[str, Any]) -> list[str]:
    server = row["server"] or {}
    return [
        row["batching"], row["protocol"], str(row["concurrency"]), fmt(row["rows_per_s"], ".0f"),
        fmt(row["pct_of_ceiling"], ".0f"), fmt(row["p50_ms"]), fmt(row["p99_ms"]),
        fmt(server.get("mean_batch_size")), fmt(server.get("queue_ms"), ".3f"), fmt(server.get("compute_ms"), ".3f"),
        fmt(_per_row(server), ".3f"),
        fmt(row["server_cpu_pct"], ".0f"), fmt(row["client_cpu_pct"], ".0f"), fmt(row["others_cpu_pct"], ".0f"),
        str(row["errors"]),
    ]


def _ceiling_cells(point: dict[str, Any]) -> list[str]:
    return [str(point["batch"]), fmt(point["latency_ms"], ".3f"), fmt(point["rows_per_s"], ".0f")]


def _note(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    return CO_LOCATION_NOTE.format(
        cpus=env["cpus"], ceiling_others=env["ceiling_others_cpu_pct"], load_before=", ".join(f"{v:.1f}" for v in env["loadavg"]),
        load_after=", ".join(f"{v:.1f}" for v in env["loadavg_after"]),
    )


def _title(doc: dict[str, Any]) -> str:
    best, model = doc["ceiling_best"], doc["model"]
    provider = doc["environment"].get("provider", "cpu")
    where = f"{doc['environment']['cpus']} cores" if provider == "cpu" else f"{provider} (GPU 0)"
    return (f"CNN width {model['width']} on {where}: in-process ceiling "
            f"{best['rows_per_s']:.0f} rows/s (batch {best['batch']}); batch-1 latency "
            f"{doc['ceiling'][0]['latency_ms']:.3f} ms")


def render_bench_table(doc: dict[str, Any], *, console: Console) -> None:
    ceiling = Table(title=f"(a) in-process ONNX Runtime, {doc['settings']['ceiling_intra_op_threads']} intra-op threads")
    for col in CEILING_COLUMNS:
        ceiling.add_column(col, justify="right")
    for point in doc["ceiling"]:
        ceiling.add_row(*_ceiling_cells(point))
    console.print(ceiling)
    table = Table(title="(b) server, 1 row per request — " + _title(doc))
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("batching", "protocol") else "right")
    for row in doc["server"]:
        table.add_row(*_server_cells(row))
    console.print(table)
    console.print(_note(doc))
    for row in doc["server"]:
        if row["errors"] or row["warmup_errors"]:
            console.print(f"[red]{row['batching']}/{row['protocol']} c={row['concurrency']}: "
                          f"{row['errors_by_kind']}, {row['warmup_errors']} in warm-up; {row['error_samples']}[/red]")


def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    s = doc["settings"]
    text = "\n\n".join([
        "# modelserve bench",
        _title(doc) + ".",
        f"Each server cell: up to {s['requests_per_cell']} requests or {s['time_cap_s']:.0f} s, closed loop; "
        f"1 instance, {s['server_intra_op_threads']} intra-op thread(s) in the server, "
        f"{s['ceiling_intra_op_threads']} in the ceiling; batching ON = `dynamic_batching {{ max_queue_delay_microseconds: {s['queue_delay_us']} }}`, "
        "OFF = no dynamic_batching (each request runs alone). queue/compute ms are the server's own per-request "
        "means (statistics extension delta; a batch's compute counts for each request in it); "
        "mean batch = inference_count / execution_count; compute ms/row = compute ms / mean batch.",
        "## (a) In-process ONNX Runtime (server's session options)",
        _md_table(CEILING_COLUMNS, [_ceiling_cells(p) for p in doc["ceiling"]]),
        "## (b) Server over HTTP",
        _md_table(COLUMNS, [_server_cells(r) for r in doc["server"]]),
        _note(doc),
        f"Bench took {doc['bench_seconds']:.0f} s.",
    ])
    path.write_text(text + "\n")


def write_plot(path: Path, doc: dict[str, Any]) -> None:
    # NOTE: heavy, optional (train extra), only for the plot
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, color in (("off", "tab:blue"), ("on", "tab:red")):  # colour: batching; line style: protocol
        for protocol, style in (("json", "o-"), ("binary", "s--")):
            rows = [r for r in doc["server"] if r["batching"] == mode and r["protocol"] == protocol]
            ax.plot([r["concurrency"] for r in rows], [r["rows_per_s"] for r in rows], style, color=color,
                    label=f"server, batching {mode.upper()}, {protocol}")
    best = doc["ceiling_best"]
    ax.axhline(best["rows_per_s"], color="k", linestyle=":",
               label=f"in-process ceiling (batch {best['batch']})")
    ax.axhline(doc["ceiling"][0]["rows_per_s"], color="grey", linestyle="-.", label="in-process batch 1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(doc["settings"]["concurrency"], [str(c) for c in doc["settings"]["concurrency"]])
    ax.set_xlabel("client concurrency (requests in flight)")
    ax.set_ylabel("rows/s (1 row per request)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput vs concurrency, CNN width {doc['model']['width']}, "
                 f"{doc['environment']['cpus']} shared cores")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
