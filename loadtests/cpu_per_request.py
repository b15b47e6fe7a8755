"""Server CPU time per request, per protocol, optionally for two versions of the code side by side.

    python -m loadtests.cpu_per_request --repository DIR --model cnn                       # this checkout
    python -m loadtests.cpu_per_request --repository DIR --model cnn --compare /tmp/before  # vs another one
    python -m loadtests.cpu_per_request --repository DIR --model cnn --protocols grpc \
        --variant ph2=GRPC_EXPERIMENTS=ph2_server                      # vs this checkout with more environment

CPU-us per request = the server process's CPU time (all threads: event loop, gRPC, ONNX Runtime) over the
requests it answered during a cell; loop CPU-us per request = the same for its main thread alone (the event
loop: HTTP, decode, batching, encode; not ONNX Runtime's threads). On a shared machine it moves far less than rows/s: other jobs slow the
server down but do not make it do more work per request. With --compare, both servers run at once and the
cells alternate between them, round by round, so both see the same machine load. Each --variant adds one more
server of this checkout, started with extra environment variables (e.g. grpcio's GRPC_EXPERIMENTS); --h2-probe
adds one whose gRPC port is loadtests/h2_probe.py (ModelInfer over the `h2` library) instead of grpcio.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from loadtests.generator import LoadConfig, Target, run_sync
from loadtests.report import summarize
from loadtests.serverproc import REPO_ROOT, cpu_seconds, loop_cpu_seconds, serve


def _cell(server, *, model: str, protocol: str, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """(server CPU-us per request, its event loop's CPU-us per request, requests/s, mean batch) of one level."""
    cfg = LoadConfig(target=Target(server.url, model, grpc_url=server.grpc_url), protocols=[protocol],
                     concurrencies=[args.concurrency], requests=10**7, time_cap_s=args.seconds, progress=False,
                     cpu_probes={"server": lambda: cpu_seconds(server.pid), "loop": lambda: loop_cpu_seconds(server.pid)})
    _, (level,) = run_sync(cfg)
    row = summarize(level)
    if row["errors"] or not level.ok:
        raise RuntimeError(f"{protocol}: {row['errors_by_kind']} {row['error_samples'][:2]}")
    cpu = level.probe_cpu_s
    batch = (row.get("server") or {}).get("mean_batch_size") or float("nan")
    return cpu["server"] / level.ok * 1e6, cpu["loop"] / level.ok * 1e6, row["requests_per_s"], batch


def _paired(samples: dict[tuple[str, str], list[tuple[float, float, float, float]]],
            protocols: list[str]) -> list[str]:
    """this / compare, round by round (the two cells of a round ran back to back, under the same load)."""
    lines = ["this / compare, round by round: median [min-max]", "",
             "| protocol | CPU-us/req | loop CPU-us/req | req/s |", "|---|---|---|---|"]
    for protocol in protocols:
        ratio = np.array(samples["this", protocol]) / np.array(samples["compare", protocol])
        cols = [f"{np.median(ratio[:, i]):.2f} [{ratio[:, i].min():.2f}-{ratio[:, i].max():.2f}]" for i in (0, 1, 2)]
        lines.append(f"| {protocol} | {' | '.join(cols)} |")
    return lines


# label -> (checkout, extra environment, module `python -m` runs)
ServerSpec = tuple[Path, dict[str, str], str]


def _servers(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, ServerSpec]:
    cli = "service.cli"
    roots: dict[str, ServerSpec] = {"this": (REPO_ROOT, {}, cli)}
    if args.compare:
        roots["compare"] = (args.compare.resolve(), {}, cli)
    for spec in args.variant:
        label, _, assignments = spec.partition("=")
        pairs = [a.split("=", 1) for a in assignments.split(";") if a]
        if not label or not pairs or any(len(kv) != 2 for kv in pairs):
            parser.error(f"--variant {spec!r}: expected LABEL=KEY=VALUE[;KEY=VALUE]")
        roots[label] = (REPO_ROOT, dict(pairs), cli)
    if args.h2_probe:
        roots["h2-probe"] = (REPO_ROOT, {}, "loadtests.h2_probe")
    return roots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.cpu_per_request", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--protocols", default="binary,json,grpc")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=4.0, help="per cell")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compare", type=Path, help="another checkout of the project (e.g. `git archive` of a commit)")
    p.add_argument("--output", type=Path, default=Path("bench_results/cpu_per_request.md"))
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=KEY=VALUE[;KEY=VALUE]",
                   help="another server of this checkout with these environment variables (repeatable)")
    p.add_argument("--h2-probe", action="store_true", help="another server of this checkout whose gRPC port is "
                                                             "loadtests.h2_probe (ModelInfer only)")
    args = p.parse_args(argv)
    roots = _servers(args, p)
    protocols = [v for v in args.protocols.split(",") if v]
    load0 = os.getloadavg()
    samples: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    with ExitStack() as stack:
        servers = {name: stack.enter_context(serve(args.repository, log_path=args.output.parent / f"server-{name}.log",
                                                   grpc="grpc" in protocols, code_root=root, env=env,
                                                   module=module))
                   for name, (root, env, module) in roots.items()}
        for i in range(args.rounds):
            for protocol in protocols:
                # Which code goes first alternates round by round, so neither always gets the quieter half.
                for name, server in sorted(servers.items(), reverse=bool(i % 2)):
                    samples.setdefault((name, protocol), []).append(
                        _cell(server, model=args.model, protocol=protocol, args=args))
    table = Table(title=f"server CPU-us per request, {args.model}, c={args.concurrency}, "
                        f"{args.rounds} rounds x {args.seconds:g} s (median, min-max)")
    columns = ("code", "protocol", "CPU-us/req", "loop CPU-us/req", "req/s", "mean batch")
    for col in columns:
        table.add_column(col)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for (name, protocol), cells in samples.items():
        arr = np.array(cells)
        row = [name, protocol, *(f"{np.median(arr[:, i]):.0f} [{arr[:, i].min():.0f}-{arr[:, i].max():.0f}]"
                                 for i in (0, 1)), f"{np.median(arr[:, 2]):.0f}", f"{np.nanmedian(arr[:, 3]):.1f}"]
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    if args.compare:
        md += ["", *_paired(samples, protocols)]
    load = f"load average {', '.join(f'{v:.1f}' for v in load0)} before, " \
           f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} after"
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(load)
    if args.compare:
        console.print("\n".join(_paired(samples, protocols)), markup=False)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(md) + f"\n\n{load}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
