"""`make bench`: the server against the in-process ONNX Runtime ceiling, on one small CNN, in one run.

    .venv/bin/python -m loadtests.bench --output bench_results/

(a) in-process ceiling: back-to-back session.run at batch 1..64 (server's session options);
(b) the real server (subprocess, free loopback ports) at several concurrencies, JSON, binary and gRPC,
    with dynamic batching ON and OFF (two copies of the model with different config.pbtxt).
Writes bench.md, bench.json, throughput.png and server.log to the output folder. The load generator
runs on the same cores as the server; both processes' CPU use is measured and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import onnxruntime
from rich.console import Console

from loadtests.adaptive_bench import main_adaptive
from loadtests.benchmodel import DEFAULT_WIDTH, PROVIDERS, build_cnn_onnx, check_provider, measure_ceiling, usable_cpus
from loadtests.benchreport import render_bench_table, write_markdown, write_plot
from loadtests.generator import LoadConfig, Target, build_bodies, fetch_model_info, measure_level
from loadtests.report import summarize, write_json
from loadtests.serverproc import ServerProcess, cpu_seconds, machine_busy_seconds, serve
from service.settings import default_cpu_threads

CEILING_BATCHES = [1, 2, 4, 8, 16, 32, 64]
MODES = {"off": "cnn_single", "on": "cnn_dynamic"}  # batching mode -> model name in the bench repository

_CONFIG_OFF = """max_batch_size: 64
instance_group [ {{ count: 1 kind: {kind} }} ]
"""
_CONFIG_ON = """max_batch_size: 64
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ count: 1 kind: {kind} }} ]
"""


def server_threads(args: argparse.Namespace) -> int:
    return args.server_threads or default_cpu_threads()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("bench_results"), help="folder for bench.md/json/png")
    p.add_argument("--concurrency", default="1,8,32", help="client concurrencies, comma-separated")
    p.add_argument("--protocols", default="json,binary,grpc",
                   help="comma-separated: json, binary (V2 HTTP) and grpc (V2 gRPC, raw contents)")
    p.add_argument("--batching", default="off,on", help="comma-separated: off, on")
    p.add_argument("--requests", type=int, default=4000, help="measured requests per cell (upper bound)")
    p.add_argument("--time-cap", type=float, default=6.0, help="seconds per cell; keeps the bench ~2-3 min")
    p.add_argument("--ceiling-seconds", type=float, default=0.5, help="timed seconds per in-process batch size")
    p.add_argument("--queue-delay-us", type=int, default=0,
                   help="max_queue_delay_microseconds with batching ON (default 0, as Triton: batches form "
                        "from what queues while the model is busy)")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help=f"CNN width (default {DEFAULT_WIDTH}: ~0.9 ms batch-1 on 2 cores)")
    p.add_argument("--server-threads", type=int, default=0,
                   help="server's MODELSERVE_CPU_THREADS (ORT intra-op threads); default: the server's own "
                        "(the usable cores, as the ceiling uses)")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu",
                   help="execution provider of the ceiling and the server (cuda/tensorrt: instances KIND_GPU)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mode", choices=["server", "adaptive"], default="server",
                   help="adaptive: no batching vs Triton's fixed delay vs adaptive, and a mixed-length text bench "
                        "(loadtests/adaptive_bench.py)")
    p.add_argument("--texts", type=int, default=512, help="--mode adaptive: texts in the text bench")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers like 1,8,32, got {args.concurrency!r}")
    args.protocols = [v for v in args.protocols.split(",") if v]
    args.batching = [v for v in args.batching.split(",") if v]
    if not args.protocols or not set(args.protocols) <= {"json", "binary", "grpc"}:
        p.error(f"--protocols must name json, binary and/or grpc, got {','.join(args.protocols)!r}")
    if not args.batching or not set(args.batching) <= set(MODES):
        p.error(f"--batching must name off and/or on, got {','.join(args.batching)!r}")
    if args.requests < 1 or args.time_cap <= 0 or args.ceiling_seconds <= 0 or min(args.concurrency) < 1:
        p.error("--requests, --concurrency must be >= 1; --time-cap and --ceiling-seconds must be > 0")
    return args


def write_repository(repo: Path, *, onnx_path: Path, delay_us: int, kind: str = "KIND_CPU") -> None:
    """Two copies of one model: the server reads config per model, so ON/OFF run in one server process."""
    for mode, name in MODES.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(onnx_path, repo / name / "1" / "model.onnx")
        config = _CONFIG_ON.format(delay_us=delay_us, kind=kind) if mode == "on" else _CONFIG_OFF.format(kind=kind)
        (repo / name / "config.pbtxt").write_text(config)


async def _measure_server(server: ServerProcess, *, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode in args.batching:
        model = MODES[mode]
        cfg = LoadConfig(target=Target(server.url, model, grpc_url=server.grpc_url), protocols=args.protocols,
                         concurrencies=args.concurrency, requests=args.requests, time_cap_s=args.time_cap,
                         progress=not args.no_progress, cpu_probes={"server": lambda: cpu_seconds(server.pid), "machine": machine_busy_seconds})
        async with aiohttp.ClientSession() as session:
            info = await fetch_model_info(session, cfg.target)
        for protocol in cfg.protocols:
            bodies = build_bodies(info, cfg, protocol=protocol)
            for concurrency in cfg.concurrencies:
                level = await measure_level(cfg, info=info, protocol=protocol, concurrency=concurrency, bodies=bodies)
                row = summarize(level)
                # Whatever the machine did beyond our two processes: other people's jobs on a shared box.
                row["others_cpu_pct"] = row["machine_cpu_pct"] - row["server_cpu_pct"] - row["client_cpu_pct"]
                rows.append({"batching": mode, "model": model, **row})
    return rows


def _run_async(coro):
    try:
        # NOTE: optional (uvicorn[standard] brings it on Linux only)
        import uvloop

        factory = uvloop.new_event_loop  # less client CPU per request: the server needs those cycles
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _environment() -> dict[str, Any]:
    return {
        "cpus": usable_cpus(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
        "machine": platform.machine(), "loadavg": os.getloadavg(),
    }


def run_bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    started = time.perf_counter()
    providers = check_provider(args.provider)
    env = {**_environment(), "provider": args.provider}
    with tempfile.TemporaryDirectory(prefix="modelserve-bench-") as tmp:
        onnx_path = Path(tmp) / "cnn.onnx"
        console.print(f"building the CNN (width {args.width}) and checking batches 1, 5, 64 against PyTorch ...")
        build_cnn_onnx(onnx_path, width=args.width)
        console.print(f"measuring the in-process ONNX Runtime ceiling on {providers[0]} ...")
        busy0, own0, t0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
        ceiling = measure_ceiling(onnx_path, batches=CEILING_BATCHES, seconds_each=args.ceiling_seconds,
                                  providers=providers)
        wall = time.perf_counter() - t0
        # Other jobs on a shared box slow the ceiling too; record how much of the machine they took.
        env["ceiling_others_cpu_pct"] = 100 * (machine_busy_seconds() - busy0 - (time.process_time() - own0)) / wall
        repo = Path(tmp) / "repo"
        write_repository(repo, onnx_path=onnx_path, delay_us=args.queue_delay_us,
                         kind="KIND_CPU" if args.provider == "cpu" else "KIND_GPU")
        console.print("starting the server and running the load ...")
        # Default: the server's own choice (service.settings.default_cpu_threads: the usable cores).
        threads = {"MODELSERVE_CPU_THREADS": str(server_threads(args)),
                   "MODELSERVE_EXECUTION_PROVIDERS": json.dumps(providers)}
        with serve(repo, log_path=args.output / "server.log", env=threads, grpc="grpc" in args.protocols) as server:
            rows = _run_async(_measure_server(server, args=args))
    best = max(ceiling, key=lambda p: p.rows_per_s)
    for row in rows:
        row["pct_of_ceiling"] = 100 * row["rows_per_s"] / best.rows_per_s
    env["loadavg_after"] = os.getloadavg()
    return {
        "model": {"arch": "conv-conv-pool-conv-pool-conv-gap-linear", "input": "[N,1,28,28] FP32",
                  "width": args.width, "max_batch_size": 64},
        "settings": {"concurrency": args.concurrency, "protocols": args.protocols, "requests_per_cell": args.requests,
                     "time_cap_s": args.time_cap, "queue_delay_us": args.queue_delay_us, "instances": 1,
                     "server_intra_op_threads": server_threads(args),
                     "ceiling_intra_op_threads": usable_cpus()},
        "environment": env,
        "ceiling": [asdict(p) for p in ceiling],
        "ceiling_best": asdict(best),
        "server": rows,
        "bench_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.mode == "adaptive":
        return main_adaptive(args, console)
    doc = run_bench(args, console)
    render_bench_table(doc, console=console)
    write_json(args.output / "bench.json", doc)
    write_markdown(args.output / "bench.md", doc)
    write_plot(args.output / "throughput.png", doc)
    console.print(f"wrote {args.output}/bench.md, bench.json, throughput.png in {doc['bench_seconds']:.0f} s")
    errors = sum(r["errors"] + r["warmup_errors"] for r in doc["server"])
    if errors:
        console.print(f"[red]{errors} request(s) failed; see the errors column and bench.json[/red]")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
