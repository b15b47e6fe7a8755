"""One process vs `--http-workers N` front ends, interleaved, against the in-process ceiling (issue "Performance").

    python -m loadtests.frontends_bench --repository DIR --model cnn --workers 1,2,3 --rounds 3

All servers run at once; each round measures the ONNX Runtime ceiling (best batch of 16/32/64) then one cell
per server, so every configuration sees the same machine load. A cell reports rows/s, its ratio to that
round's ceiling and CPU-us per request of the model process and of the front ends (process CPU time over
requests answered), and the load generator's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import onnxruntime

from loadtests.benchmodel import check_provider, measure_ceiling
from loadtests.generator import LoadConfig, Target, run_sync
from loadtests.report import summarize
from loadtests.serverproc import REPO_ROOT, ServerProcess, serve, tree_cpu_seconds


def _counts(server: ServerProcess, model: str) -> tuple[int, int]:
    """(rows, batches) the model has run so far, from the statistics API."""
    stats = httpx.get(f"http://{server.url}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def _cell(server: ServerProcess, *, protocol: str, args: argparse.Namespace) -> tuple[float, ...]:
    """(rows/s, CPU-us per request of the model process, of the front ends, of the load generator, mean batch)
    of one timed level."""
    rows0, runs0 = _counts(server, args.model)
    before, own = tree_cpu_seconds(server.pid), time.process_time()
    cfg = LoadConfig(target=Target(server.url, args.model, grpc_url=server.grpc_url), protocols=[protocol],
                     concurrencies=[args.concurrency], requests=10**7, time_cap_s=args.seconds, progress=False)
    _, (level,) = run_sync(cfg)
    after, own = tree_cpu_seconds(server.pid), time.process_time() - own
    row = summarize(level)
    if row["errors"] or not level.ok:
        raise RuntimeError(f"{row['errors_by_kind']} {row['error_samples'][:2]}")
    main = (after[str(server.pid)] - before[str(server.pid)]) / level.ok * 1e6
    fronts = sum(after[p] - before.get(p, after[p]) for p in after if p != str(server.pid)) / level.ok * 1e6
    rows1, runs1 = _counts(server, args.model)
    return row["requests_per_s"], main, fronts, own / level.ok * 1e6, (rows1 - rows0) / max(1, runs1 - runs0)


def _ceiling(path: Path, *, seconds: float) -> float:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {"input_name": session.get_inputs()[0].name, "output_name": session.get_outputs()[0].name}
    del session
    points = measure_ceiling(path, batches=[16, 32, 64], seconds_each=seconds, rounds=1,
                             providers=check_provider("cpu"), **names)
    return max(p.rows_per_s for p in points)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.frontends_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", default="cnn")
    p.add_argument("--protocols", default="binary,grpc", help="comma-separated: binary, json, grpc")
    p.add_argument("--workers", default="1,2", help="comma-separated --http-workers values (1: one process); "
                                                    "a trailing c (e.g. 2c) runs the --compare checkout's code")
    p.add_argument("--compare", type=Path, help="another checkout of the project (e.g. `git archive` of a commit)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=4.0, help="per cell")
    p.add_argument("--ceiling-seconds", type=float, default=1.5, help="per batch size per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", type=Path, default=Path("bench_results/frontends.md"))
    args = p.parse_args(argv)
    onnx_path = next((args.repository / args.model).glob("*/model.onnx"))
    workers = [v for v in args.workers.split(",") if v]
    if any(w.endswith("c") for w in workers) and args.compare is None:
        p.error("--workers with a trailing c needs --compare DIR")
    load0 = os.getloadavg()
    protocols = [v for v in args.protocols.split(",") if v]
    cells: dict[tuple[str, str], list[tuple[float, ...]]] = {(pr, w): [] for pr in protocols for w in workers}
    with ExitStack() as stack:
        servers = {w: stack.enter_context(serve(
            args.repository, log_path=args.output.parent / f"server-w{w}.log", grpc="grpc" in protocols,
            code_root=args.compare.resolve() if w.endswith("c") else REPO_ROOT,
            extra_args=["--http-workers", w.rstrip("c")] if w.rstrip("c") != "1" else None)) for w in workers}
        for _ in range(args.rounds):
            ceiling = _ceiling(onnx_path, seconds=args.ceiling_seconds)
            for protocol in protocols:
                for n, server in servers.items():
                    cells[protocol, n].append((ceiling, *_cell(server, protocol=protocol, args=args)))
    load1 = os.getloadavg()
    lines = ["| protocol | --http-workers | rows/s median [min-max] | / ceiling (same round) | model-process CPU-us/req "
             "| front-end CPU-us/req | load generator CPU-us/req | mean batch |",
             "|---|---|---|---|---|---|---|---|"]
    for (protocol, n), rows in cells.items():
        arr = np.array(rows)
        rate, ratio = arr[:, 1], arr[:, 1] / arr[:, 0]
        lines.append(f"| {protocol} | {n} | {np.median(rate):.0f} [{rate.min():.0f}-{rate.max():.0f}] | {np.median(ratio):.2f} "
                     f"[{ratio.min():.2f}-{ratio.max():.2f}] | {np.median(arr[:, 2]):.0f} | {np.median(arr[:, 3]):.0f} "
                     f"| {np.median(arr[:, 4]):.0f} | {np.median(arr[:, 5]):.1f} |")
    ceilings = np.array([r[0] for r in next(iter(cells.values()))])
    lines.append(f"\n{args.model}, c={args.concurrency}, {args.rounds} rounds x {args.seconds:g} s; "
                 f"ceiling {np.median(ceilings):.0f} rows/s median [{ceilings.min():.0f}-{ceilings.max():.0f}]; "
                 f"load average {', '.join(f'{v:.1f}' for v in load0)} before, "
                 f"{', '.join(f'{v:.1f}' for v in load1)} after")
    text = "\n".join(lines)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
