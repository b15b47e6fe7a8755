"""The GPU path measured in one run (docs/BENCHMARKS.md, "GPU path"):

    python -m loadtests.gpu_bench --provider cuda --output gpu_results/
    python -m loadtests.gpu_bench --provider cpu --quick --output /tmp/gpu_check   # no GPU: proves the script

(a) in-process ceiling: back-to-back session.run on the provider, FP32 and its FP16 variant interleaved,
    at several batch sizes (the best is the ceiling the server is compared with);
(b) the real server (subprocess) at each concurrency over binary HTTP and gRPC, once serving FP32 and once
    with the FP16 variant published next to it (MODELSERVE_GPU_FP16_VARIANTS; the server log says which
    file each instance loaded, and the table shows it);
(c) GPU utilization sampled through NVML during every ceiling batch size and every load level: whether
    the front end keeps the GPU as busy as ONNX Runtime alone does.
Writes gpu_bench.md and gpu_bench.json; exits 0 when every request succeeded. Needs no torch: the CNN is
built with onnx.helper, the FP16 variant with export/fp16.py (the converter `modelserve optimize` uses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime

from export.fp16 import convert as to_fp16
from loadtests.benchmodel import (
    INPUT_DIMS,
    INPUT_NAME,
    OUTPUT_NAME,
    PROVIDERS,
    check_provider,
    ort_session,
    timed_runs,
    usable_cpus,
)
from loadtests.generator import LoadConfig, Target, build_bodies, fetch_model_info, measure_level
from loadtests.gpu_benchreport import write_markdown
from loadtests.gpu_sampler import GpuSampler, gpu_name
from loadtests.gpumodel import build_cnn
from loadtests.report import summarize, write_json
from loadtests.serverproc import ServerProcess, cpu_seconds, machine_busy_seconds, serve
from service.iobinding import BoundRunner
from service.modelrepo.config import graph_tensors

PRECISIONS = ("fp32", "fp16")
# Server runs: (label, MODELSERVE_GPU_FP16_VARIANTS, MODELSERVE_IO_BINDING); auto binds GPU instances only.
SERVER_RUNS = (("fp32", False, "auto"), ("fp16", True, "auto"), ("fp32-unbound", False, "off"))
MODEL = "cnn"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.gpu_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    p.add_argument("--output", type=Path, default=Path("gpu_results"))
    p.add_argument("--quick", action="store_true",
                   help="seconds, not minutes: small model, concurrency 1,8, short cells (a smoke run)")
    p.add_argument("--concurrency", default="1,32,256")
    p.add_argument("--protocols", default="binary,grpc")
    p.add_argument("--batches", default="1,8,32,64,128,256", help="ceiling batch sizes (max = max_batch_size)")
    p.add_argument("--width", type=int, default=128, help="CNN width (channels of the first conv)")
    p.add_argument("--time-cap", type=float, default=8.0, help="seconds per load level")
    p.add_argument("--requests", type=int, default=200_000, help="requests per load level (upper bound)")
    p.add_argument("--ceiling-seconds", type=float, default=1.0, help="timed seconds per precision and batch")
    p.add_argument("--instances", type=int, default=1, help="instances of the served model (all on GPU 0)")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.batches, args.width = "1,8", "1,8", 16
        args.time_cap, args.requests, args.ceiling_seconds = 0.4, 300, 0.2
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        args.batches = sorted(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error("--concurrency and --batches must be comma-separated integers")
    args.protocols = [v for v in args.protocols.split(",") if v]
    if not set(args.protocols) <= {"json", "binary", "grpc"} or not args.protocols:
        p.error(f"--protocols must name json, binary and/or grpc, got {args.protocols}")
    if min(args.concurrency) < 1 or min(args.batches) < 1 or args.instances < 1:
        p.error("--concurrency, --batches and --instances must be >= 1")
    return args


class _Bound:
    """A BoundRunner with session.run's signature, so the same timing loop measures both paths."""

    def __init__(self, runner: BoundRunner) -> None:
        self.runner = runner

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(feeds, names)


def _runners(path: Path, *, providers: list[str], max_rows: int) -> dict[str, Any]:
    """The two ways the server runs a session: plain session.run, and I/O binding (pinned on CUDA)."""
    session = ort_session(path, providers=providers)
    inputs, outputs = graph_tensors(session)
    return {"run": session, "iobinding": _Bound(BoundRunner(session, inputs=inputs, outputs=outputs,
                                                            max_rows=max_rows))}


def ceiling(files: dict[str, Path], *, args: argparse.Namespace, providers: list[str]) -> list[dict[str, Any]]:
    """Back-to-back runs on one session per precision, each through session.run and through I/O binding;
    every (precision, path, batch) interleaved over two rounds, each keeping its best; GPU utilization
    sampled during each point."""
    rng = np.random.default_rng(1)
    feeds = {b: {INPUT_NAME: rng.standard_normal((b, *INPUT_DIMS)).astype(np.float32)} for b in args.batches}
    runners = {(p, mode): runner for p in PRECISIONS
               for mode, runner in _runners(files[p], providers=providers, max_rows=max(args.batches)).items()}
    for runner in runners.values():
        for batch in args.batches:  # first runs allocate arenas and pick kernels (cuDNN's algorithm search)
            for _ in range(3):
                runner.run([OUTPUT_NAME], feeds[batch])
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for _ in range(2):
        for (precision, mode), runner in runners.items():
            for batch in args.batches:
                with GpuSampler() as gpu:
                    times = timed_runs(runner, feeds[batch], seconds=args.ceiling_seconds / 2)
                row = {"precision": precision, "path": mode, "batch": batch,
                       "latency_ms": float(np.median(times) * 1e3), "rows_per_s": float(batch / times.mean()),
                       "runs": len(times), **gpu.summary()}
                key = (precision, mode, batch)
                if key not in best or row["rows_per_s"] > best[key]["rows_per_s"]:
                    best[key] = row
    return [best[key] for key in sorted(best, key=lambda k: (PRECISIONS.index(k[0]), k[1] != "run", k[2]))]


def write_repository(repo: Path, *, files: dict[str, Path], kind: str, max_batch: int, instances: int) -> None:
    """`cnn` and its FP16 variant `cnn-fp16` as `modelserve optimize --publish` lays them out (card names the
    variant and its parent), so the server's own selection decides what a GPU instance serves."""
    config = (f"max_batch_size: {max_batch}\ndynamic_batching {{ }}\n"
              f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n")
    for name, precision in ((MODEL, "fp32"), (f"{MODEL}-fp16", "fp16")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.onnx").write_bytes(files[precision].read_bytes())
        (repo / name / "config.pbtxt").write_text(config)
    (repo / f"{MODEL}-fp16" / "metrics.json").write_text(json.dumps({"variant": "fp16", "parent": MODEL}))


def load_line(log_path: Path) -> tuple[list[str], int | None]:
    """(files the `cnn` instances loaded, instances with I/O binding), from the server's load log line
    (service/model.py)."""
    found = re.findall(rf"model {MODEL} v1: .* serving \[([^\]]*)\].* io binding on (\d+)",
                       log_path.read_text(errors="replace"))
    if not found:
        return [], None
    files, bound = found[-1]
    return [f.strip(" '") for f in files.split(",")], int(bound)


async def _load(server: ServerProcess, *, args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = LoadConfig(target=Target(server.url, MODEL, grpc_url=server.grpc_url), protocols=args.protocols,
                     concurrencies=args.concurrency, requests=args.requests, time_cap_s=args.time_cap,
                     progress=False, cpu_probes={"server": lambda: cpu_seconds(server.pid),
                                                 "machine": machine_busy_seconds})
    async with aiohttp.ClientSession() as session:
        info = await fetch_model_info(session, cfg.target)
    rows = []
    for protocol in cfg.protocols:
        bodies = build_bodies(info, cfg, protocol=protocol)
        for concurrency in cfg.concurrencies:
            with GpuSampler() as gpu:
                level = await measure_level(cfg, info=info, protocol=protocol, concurrency=concurrency, bodies=bodies)
            row = summarize(level)
            row.pop("server", None)  # the statistics delta: kept out of the table's JSON to keep it short
            rows.append({**row, **gpu.summary()})
    return rows


def server_runs(files: dict[str, Path], *, args: argparse.Namespace, providers: list[str],
                tmp: Path) -> list[dict[str, Any]]:
    repo = tmp / "repo"
    kind = "KIND_CPU" if args.provider == "cpu" else "KIND_GPU"
    write_repository(repo, files=files, kind=kind, max_batch=max(args.batches), instances=args.instances)
    rows: list[dict[str, Any]] = []
    for label, fp16, io_binding in SERVER_RUNS:
        env = {"MODELSERVE_EXECUTION_PROVIDERS": json.dumps(providers),
               "MODELSERVE_GPU_FP16_VARIANTS": str(fp16).lower(), "MODELSERVE_IO_BINDING": io_binding}
        log_path = args.output / f"server-{label}.log"
        # info: the load line says which file each instance serves (no access log: the server has none)
        with serve(repo, log_path=log_path, env=env, grpc="grpc" in args.protocols, log_level="info") as server:
            measured = asyncio.run(_load(server, args=args))
        served, bound = load_line(log_path)
        # What ran, from the log: on CPU the server keeps FP32 even with the variant allowed.
        ran = "fp16" if served and all(f"{MODEL}-fp16/" in f for f in served) else "fp32" if served else "?"
        rows.extend({"run": label, "fp16_variants": fp16, "io_binding": io_binding, "served": served,
                     "precision": ran, "io_bound_instances": bound, **row}
                    for row in measured)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    providers = check_provider(args.provider)
    env = {"provider": args.provider, "providers": providers, "gpu": gpu_name(), "cpus": usable_cpus(),
           "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
           "loadavg_before": os.getloadavg(), "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="modelserve-gpu-bench-") as tmp:
        files = {"fp32": build_cnn(Path(tmp) / "cnn.onnx", width=args.width)}
        files["fp16"] = to_fp16(files["fp32"], Path(tmp) / "cnn-fp16.onnx")
        print(f"ceiling on {providers[0]}: FP32 and FP16 at batches {args.batches} ...", flush=True)
        points = ceiling(files, args=args, providers=providers)
        print(f"server on {providers[0]}: {args.protocols} at concurrency {args.concurrency} ...", flush=True)
        rows = server_runs(files, args=args, providers=providers, tmp=Path(tmp))
    for row in rows:
        same = [p["rows_per_s"] for p in points if p["precision"] == row["precision"]]
        row["pct_of_ceiling"] = 100 * row["rows_per_s"] / max(same) if same else None
    env["loadavg_after"] = os.getloadavg()
    return {"environment": env, "model": {"arch": "conv-conv-pool-conv-pool-conv-gap-linear", "width": args.width,
                                          "input": "[N,1,28,28] FP32", "max_batch_size": max(args.batches),
                                          "instances": args.instances},
            "settings": {"concurrency": args.concurrency, "protocols": args.protocols, "time_cap_s": args.time_cap,
                         "requests_per_level": args.requests, "ceiling_seconds": args.ceiling_seconds},
            "ceiling": points, "server": rows, "bench_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    doc = run(args)
    write_json(args.output / "gpu_bench.json", doc)
    markdown = write_markdown(args.output / "gpu_bench.md", doc)
    print(markdown)
    errors = sum(r["errors"] + r["warmup_errors"] for r in doc["server"])
    print(f"wrote {args.output}/gpu_bench.md and gpu_bench.json in {doc['bench_seconds']:.0f} s"
          + (f"; {errors} request(s) FAILED (see error_samples in the JSON)" if errors else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
