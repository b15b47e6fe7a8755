"""The bench's serving matrix: two CNNs x three batching policies x three protocols x concurrencies.

One server holds a copy of each CNN per policy — no batching, Triton's fixed `max_queue_delay`, and adaptive
batching with the same delay as its upper bound — so every cell runs against the same process. Policies are the
innermost loop: for one (model, concurrency, protocol) the three run back to back, so their figures are
side by side under the same machine load. Every cell records the server's CPU time per request (process CPU
seconds over the requests answered), which a busy machine distorts less than rows/s.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from loadtests import h2load
from loadtests.generator import LoadConfig, Target, build_bodies, fetch_model_info, measure_level
from loadtests.report import summarize
from loadtests.serverproc import ServerProcess, cpu_seconds, machine_busy_seconds

POLICIES = ("none", "fixed", "adaptive")
CNNS = ("bench_cnn", "zoo_cnn")  # the bench's own CNN (loadtests/benchmodel.py) and the zoo `cnn` (ResNetSmall)
CLIENTS = ("python", "h2load")  # the aiohttp/grpc.aio generator (loadtests/generator.py) and h2load (C, loadtests/h2load.py)


def policy_config(policy: str, *, delay_us: int, max_batch_size: int = 64, kind: str = "KIND_CPU") -> str:
    """config.pbtxt for one batching policy (no input/output section: the server completes it from the graph)."""
    text = f"max_batch_size: {max_batch_size}\ninstance_group [ {{ count: 1 kind: {kind} }} ]\n"
    if policy == "none":
        return text
    text += f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    # Each copy names its policy: the server's default (adaptive since round 4) must not decide what "fixed" means.
    adaptive = "true" if policy == "adaptive" else "false"
    return text + f'parameters {{ key: "adaptive_batching" value: {{ string_value: "{adaptive}" }} }}\n'


def model_name(cnn: str, policy: str) -> str:
    return f"{cnn}_{policy}"


def write_cnn_models(repo: Path, *, onnx_paths: dict[str, Path], delay_us: int, policies: list[str],
                     kind: str = "KIND_CPU") -> None:
    """A copy of each CNN per policy; a copy's config is its policy (instances of `kind`)."""
    for cnn, path in onnx_paths.items():
        for policy in policies:
            folder = repo / model_name(cnn, policy)
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(path, folder / "1" / "model.onnx")
            (folder / "config.pbtxt").write_text(policy_config(policy, delay_us=delay_us, kind=kind))


async def _cell(server: ServerProcess, *, model: str, protocol: str, concurrency: int,
                args: argparse.Namespace, client: str = "python") -> dict[str, Any]:
    cfg = LoadConfig(target=Target(server.url, model, grpc_url=server.grpc_url), protocols=[protocol],
                     concurrencies=[concurrency], requests=args.requests, time_cap_s=args.time_cap, progress=False,
                     cpu_probes={"server": lambda: cpu_seconds(server.pid), "machine": machine_busy_seconds})
    async with aiohttp.ClientSession() as session:
        info = await fetch_model_info(session, cfg.target)
    bodies = build_bodies(info, cfg, protocol=protocol)
    if client == "h2load":
        # h2load runs for the cell's time cap (it has no request cap that ends a closed loop early).
        level = h2load.measure_level(cfg.target, info=info, protocol=protocol, concurrency=concurrency,
                                     req=bodies[0], seconds=args.time_cap, cpu_probes=cfg.cpu_probes)
    else:
        level = await measure_level(cfg, info=info, protocol=protocol, concurrency=concurrency, bodies=bodies)
    row = summarize(level)
    row["client"] = client
    # Whatever the machine did beyond our two processes: other people's jobs on a shared box.
    row["others_cpu_pct"] = row["machine_cpu_pct"] - row["server_cpu_pct"] - row["client_cpu_pct"]
    server_cpu_s = row["server_cpu_pct"] / 100 * (level.elapsed_s or 0.0)
    row["server_cpu_us_per_req"] = server_cpu_s / level.ok * 1e6 if level.ok else None
    row["client_cpu_us_per_req"] = level.client_cpu_s / level.ok * 1e6 if level.ok else None
    return row


async def run_matrix(server: ServerProcess, *, cnns: list[str], args: argparse.Namespace,
                     progress=print) -> list[dict[str, Any]]:
    """Every (cnn, concurrency, protocol, policy, client) cell; policies, then clients innermost (side by side)."""
    rows = []
    for cnn in cnns:
        for concurrency in args.concurrency:
            for protocol in args.protocols:
                for policy in args.policies:
                    model = model_name(cnn, policy)
                    for client in getattr(args, "clients", ["python"]):
                        row = await _cell(server, model=model, protocol=protocol, concurrency=concurrency, args=args,
                                          client=client)
                        rows.append({"section": "serve", "cnn": cnn, "batching": policy, "model": model, **row})
                        progress(f"  {cnn:9s} {policy:8s} {protocol:6s} c={concurrency:<3d} {client:7s}"
                                 f"{row['rows_per_s']:8.0f} rows/s  p50 {row['p50_ms'] or 0:7.2f} ms  "
                                 f"server {row['server_cpu_us_per_req'] or 0:7.0f} CPU-us/req  "
                                 f"client {row['client_cpu_us_per_req'] or 0:5.0f}")
    return rows
