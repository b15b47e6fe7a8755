"""`make bench`: the whole serving matrix against in-process ceilings measured in the same run.

    .venv/bin/python -m loadtests.bench --output bench_results/          # ~8-10 min
    .venv/bin/python -m loadtests.bench --quick --output bench_results/  # ~2-3 min, for trying it

(a) ceilings: in-process ONNX Runtime (the server's session options) for the bench CNN and the zoo `cnn` at
    batch 1..64, and for the tiny zoo transformer on mixed-length texts (arrival order vs sorted by length);
(b) serving (loadtests/benchmatrix.py): both CNNs x {no batching, Triton's fixed delay, adaptive} x {V2 JSON,
    V2 binary, V2 gRPC} x concurrency {1, 32} x load generator {python (aiohttp / grpc.aio), h2load (C: the
    server's capacity without a Python client eating the shared cores; loadtests/h2load.py)}, one server
    process, policies and clients side by side;
(c) text: the mixed-length set at concurrency 32, shapes-must-match vs length-aware batching (loadtests/textbench.py);
(d) offline: `modelserve predict` per zoo model against ONNX Runtime alone, text sorted by length
    (loadtests/offline_bench.py).
Prints one table and writes bench.md, bench.json and server.log to the output folder. The zoo is the tiny
profile built into a temporary folder, unless --zoo names a built one (read only: models are copied).
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

import onnxruntime
from rich.console import Console

from loadtests import h2load, offline_bench
from loadtests.benchmatrix import CLIENTS, CNNS, POLICIES, run_matrix, write_cnn_models
from loadtests.benchmodel import DEFAULT_WIDTH, PROVIDERS, build_cnn_onnx, check_provider, measure_ceiling, usable_cpus
from loadtests.benchreport import render, write_markdown
from loadtests.report import write_json
from loadtests.serverproc import cpu_seconds, machine_busy_seconds, serve
from loadtests.textbench import TEXT_MODELS, docstrings, text_ceiling, text_level, write_text_models
from service.settings import default_cpu_threads

CEILING_BATCHES = [1, 2, 4, 8, 16, 32, 64]
SECTIONS = ("serve", "text", "offline")
MODES = {"off": "cnn_single", "on": "cnn_dynamic"}  # loadtests.pyspy's two copies of the bench CNN
_CONFIG_OFF = "max_batch_size: 64\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n"
_CONFIG_ON = ("max_batch_size: 64\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
              "instance_group [ {{ count: 1 kind: KIND_CPU }} ]\n")
_QUICK = {"requests": 300, "time_cap": 1.0, "ceiling_seconds": 0.2, "texts": 96, "offline_rows": 256}
_FULL = {"requests": 4000, "time_cap": 5.0, "ceiling_seconds": 0.6, "texts": 384, "offline_rows": 2000}


def _csv(text: str, *, allowed: tuple[str, ...] | None, what: str, p: argparse.ArgumentParser) -> list[str]:
    values = [v for v in text.split(",") if v]
    if not values or (allowed is not None and not set(values) <= set(allowed)):
        p.error(f"--{what} must be comma-separated values of {', '.join(allowed or ())}, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("bench_results"), help="folder for bench.md/json")
    p.add_argument("--quick", action="store_true", help="short cells and small sets (~2-3 min): for trying it")
    p.add_argument("--zoo", type=Path, default=None, help="a built model repository (default: build the tiny zoo)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: serve, text, offline")
    p.add_argument("--concurrency", default="1,32", help="client concurrencies of the serving cells")
    p.add_argument("--protocols", default="json,binary,grpc", help="comma-separated: json, binary, grpc")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated: none, fixed, adaptive")
    p.add_argument("--clients", default=None,
                   help="load generators of the serving cells, comma-separated: python, h2load (default: both when "
                        "h2load is installed, `make tools`; else python)")
    p.add_argument("--delay-us", type=int, default=3000, help="max_queue_delay_microseconds (fixed; adaptive's bound)")
    p.add_argument("--requests", type=int, default=None, help="measured requests per serving cell (upper bound)")
    p.add_argument("--time-cap", type=float, default=None, help="seconds per serving cell")
    p.add_argument("--ceiling-seconds", type=float, default=None, help="timed seconds per in-process batch size")
    p.add_argument("--texts", type=int, default=None, help="texts in the mixed-length set")
    p.add_argument("--text-concurrency", type=int, default=32)
    p.add_argument("--offline-rows", type=int, default=None, help="rows per offline case")
    p.add_argument("--offline-batch", type=int, default=32)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH, help=f"bench CNN width (default {DEFAULT_WIDTH})")
    p.add_argument("--server-threads", type=int, default=0, help="server's MODELSERVE_CPU_THREADS (default: its own)")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu",
                   help="execution provider of the ceilings and the server's CNNs (cuda/tensorrt: KIND_GPU instances)")
    args = p.parse_args(argv)
    for key, value in (_QUICK if args.quick else _FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers like 1,32, got {args.concurrency!r}")
    args.sections = _csv(args.sections, allowed=SECTIONS, what="sections", p=p)
    args.protocols = _csv(args.protocols, allowed=("json", "binary", "grpc"), what="protocols", p=p)
    args.policies = _csv(args.policies, allowed=POLICIES, what="policies", p=p)
    if args.clients is None:
        args.clients = ",".join(CLIENTS) if h2load.available() else "python"
    args.clients = _csv(args.clients, allowed=CLIENTS, what="clients", p=p)
    if "h2load" in args.clients and not h2load.available():
        p.error("--clients h2load: h2load is not installed (Debian's nghttp2-client; `make tools` installs it)")
    if min(args.requests, args.texts, args.offline_rows, *args.concurrency) < 1 or args.time_cap <= 0:
        p.error("--requests, --texts, --offline-rows and --concurrency must be >= 1; --time-cap must be > 0")
    if args.zoo is not None and not (args.zoo / "cnn").is_dir():
        p.error(f"--zoo {args.zoo}: no `cnn` model there; build one with `modelserve build`")
    return args


def write_repository(repo: Path, *, onnx_path: Path, delay_us: int) -> None:
    """Two copies of the bench CNN, batching off and on (loadtests.pyspy profiles these)."""
    for mode, name in MODES.items():
        (repo / name / "1").mkdir(parents=True)
        shutil.copyfile(onnx_path, repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(_CONFIG_ON.format(delay_us=delay_us) if mode == "on" else _CONFIG_OFF)


def _run_async(coro):
    try:
        # NOTE: optional (uvicorn[standard] brings it on Linux only)
        import uvloop

        factory = uvloop.new_event_loop  # less client CPU per request: the server needs those cycles
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _ceiling(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {"input_name": session.get_inputs()[0].name, "output_name": session.get_outputs()[0].name}
    busy0, own0, t0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    points = measure_ceiling(path, batches=CEILING_BATCHES, seconds_each=args.ceiling_seconds,
                             providers=check_provider(args.provider), **names)
    wall = time.perf_counter() - t0
    best = max(points, key=lambda p: p.rows_per_s)
    # Other jobs on a shared box slow the ceiling too; record how much of the machine they took.
    others = 100 * (machine_busy_seconds() - busy0 - (time.process_time() - own0)) / wall
    return {"points": [asdict(p) for p in points], "best": asdict(best), "others_cpu_pct": others}


def _zoo(args: argparse.Namespace, root: Path, console: Console) -> Path:
    if args.zoo is not None:
        return args.zoo
    from models import build  # NOTE: the zoo builder (torch) only when no built zoo is given

    zoo = root / "zoo"
    families = "cnn,transformer,recommender" if args.quick else "cnn,transformer,speech,recommender"
    console.print(f"building the tiny zoo ({families}) ...")
    if build.main(["--profile", "tiny", "--model-repository", str(zoo), "--families", families]) != 0:
        raise RuntimeError("tiny zoo build failed; see its build.log")
    return zoo


def _serve_and_text(doc: dict[str, Any], *, repo: Path, texts: list[str], args: argparse.Namespace,
                    console: Console) -> None:
    threads = {"MODELSERVE_CPU_THREADS": str(args.server_threads or default_cpu_threads()),
               "MODELSERVE_EXECUTION_PROVIDERS": json.dumps(check_provider(args.provider))}
    with serve(repo, log_path=args.output / "server.log", env=threads, grpc="grpc" in args.protocols) as server:
        if "serve" in args.sections:
            console.print("serving matrix ...")
            doc["serve"] = _run_async(run_matrix(server, cnns=list(CNNS), args=args, progress=console.print))
        if "text" in args.sections:
            console.print("text, mixed lengths ...")
            doc["text"] = [_run_async(text_level(server.url, m, texts, concurrency=args.text_concurrency,
                                                 cpu=lambda: cpu_seconds(server.pid))) for m in TEXT_MODELS]


def _offline(zoo: Path, args: argparse.Namespace, root: Path, console: Console) -> list[dict[str, Any]]:
    console.print("offline predict vs ceiling ...")
    rows = []
    for model, kind in offline_bench.CASES:
        if not (zoo / model).is_dir():
            continue
        case = root / f"offline-{model}-{kind}"
        case.mkdir()
        src = offline_bench.make_input(kind, root=case, rows=args.offline_rows)
        e2e = offline_bench.end_to_end(model, repo=zoo, src=src, out=case / "out.parquet", batch_size=args.offline_batch)
        top = offline_bench.ceiling(zoo / model, src=src, batch_size=args.offline_batch)
        rows.append({"model": model, "input": kind, "rows": args.offline_rows, "batch_size": args.offline_batch,
                     "predict_rows_s": e2e, "ceiling_rows_s": top, "fraction": e2e / top})
    return rows


def _ratios(doc: dict[str, Any]) -> None:
    for row in doc.get("serve", []):
        ceiling = doc["ceilings"][row["cnn"]]
        row["ceiling_rows_per_s"] = ceiling["best"]["rows_per_s"]
        row["ratio"] = row["rows_per_s"] / row["ceiling_rows_per_s"]
        row["p50_minus_b1_ms"] = None if row["p50_ms"] is None else row["p50_ms"] - ceiling["points"][0]["latency_ms"]
    for row in doc.get("text", []):
        row["ceiling_rows_per_s"] = doc["text_ceiling"]["sorted_by_length"]
        row["ratio"] = row["rows_per_s"] / row["ceiling_rows_per_s"]


def run_bench(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    started = time.perf_counter()
    doc: dict[str, Any] = {"environment": {"cpus": usable_cpus(), "python": platform.python_version(),
                                           "onnxruntime": onnxruntime.__version__, "loadavg": os.getloadavg(),
                                           "provider": args.provider},
                           "settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()}}
    doc["settings"].update(delay_us=args.delay_us, time_cap_s=args.time_cap)
    with tempfile.TemporaryDirectory(prefix="modelserve-bench-") as tmp:
        root = Path(tmp)
        zoo = _zoo(args, root, console)
        console.print(f"building the bench CNN (width {args.width}) ...")
        onnx_paths = {"bench_cnn": build_cnn_onnx(root / "bench_cnn.onnx", width=args.width),
                      "zoo_cnn": zoo / "cnn" / "1" / "model.onnx"}
        console.print("in-process ceilings ...")
        doc["ceilings"] = {name: _ceiling(path, args) for name, path in onnx_paths.items()}
        texts = docstrings(args.texts)
        if "text" in args.sections:
            doc["text_ceiling"] = text_ceiling(zoo / "transformer", texts)
        repo = root / "repo"
        write_cnn_models(repo, onnx_paths=onnx_paths, delay_us=args.delay_us, policies=args.policies,
                         kind="KIND_CPU" if args.provider == "cpu" else "KIND_GPU")
        write_text_models(repo, zoo)
        if {"serve", "text"} & set(args.sections):
            _serve_and_text(doc, repo=repo, texts=texts, args=args, console=console)
        if "offline" in args.sections:
            doc["offline"] = _offline(zoo, args, root, console)
    _ratios(doc)
    doc["environment"]["loadavg_after"] = os.getloadavg()
    doc["bench_seconds"] = time.perf_counter() - started
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    args.output.mkdir(parents=True, exist_ok=True)
    doc = run_bench(args, console)
    render(doc, console=console)
    write_json(args.output / "bench.json", doc)
    write_markdown(args.output / "bench.md", doc)
    console.print(f"wrote {args.output}/bench.md and bench.json in {doc['bench_seconds']:.0f} s")
    errors = sum(r["errors"] + r["warmup_errors"] for r in doc.get("serve", []))
    if errors:
        console.print(f"[red]{errors} request(s) failed; see bench.json (error_samples)[/red]")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
