"""How the batcher's wait decides a saturated closed loop: copies of one model that differ only in their
dynamic_batching wait, served side by side, cells interleaved round by round.

    python -m loadtests.dispatch_ab --zoo /tmp/zoo --variants fixed:3000,adaptive:3000,fixed:0,zoo \
        --concurrency 32 --protocols binary --rounds 6 --output dispatch_ab/

A variant is `fixed:<delay us>` (Triton's max_queue_delay), `adaptive:<delay us>` (the planner, the delay as its
bound) or `zoo` (the model's own config.pbtxt as `modelserve build` wrote it). `--servers` runs one server per
entry, each `label` or `label:KEY=VALUE;KEY=VALUE` (MODELSERVE_* settings, e.g.
`off,spin:MODELSERVE_ALLOW_SPINNING=true`), so server settings are compared the same way. Each cell is one
closed-loop level from `loadtests.benchmatrix` (h2load by default: the C client leaves the server its cores);
the order of servers alternates between rounds. Prints a table of medians [min-max] over the rounds and writes
it with every cell to dispatch_ab.md / dispatch_ab.json in --output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from loadtests import benchmatrix
from loadtests.bench import _ceiling as bench_ceiling
from loadtests.serverproc import serve
from service.modelrepo.config import parse_config_text


def variant_config(variant: str, *, zoo_config: str, name: str) -> str:
    """config.pbtxt of one variant (inputs and outputs completed by the server from the graph)."""
    if variant == "zoo":
        return zoo_config.replace(f'name: "{parse_config_text(zoo_config).name}"', f'name: "{name}"')
    policy, _, delay = variant.partition(":")
    if policy not in ("fixed", "adaptive") or not delay.isdigit():
        raise SystemExit(f"variant {variant!r}: expected fixed:<delay us>, adaptive:<delay us> or zoo")
    return benchmatrix.policy_config(policy, delay_us=int(delay))


def variant_name(variant: str) -> str:
    return variant.replace(":", "_")


def parse_servers(spec: str) -> list[tuple[str, dict[str, str]]]:
    servers = []
    for entry in spec.split(","):
        label, _, settings = entry.partition(":")
        env = dict(kv.split("=", 1) for kv in settings.split(";") if kv)
        if not label or any(not k.startswith("MODELSERVE_") for k in env):
            raise SystemExit(f"server {entry!r}: expected label or label:MODELSERVE_KEY=VALUE;...")
        servers.append((label, env))
    return servers


def write_repo(repo: Path, *, zoo: Path, model: str, variants: list[str]) -> None:
    source = zoo / model
    own = (source / "config.pbtxt").read_text()
    for variant in variants:
        name = variant_name(variant)
        shutil.copytree(source, repo / name)  # labels and the graph as built; the config is the variant's
        (repo / name / "config.pbtxt").write_text(variant_config(variant, zoo_config=own, name=name))


def table(cells: list[dict[str, Any]], *, ceiling: float | None) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["protocol"], c["concurrency"], c["variant"], c["label"]), []).append(c)
    med = statistics.median
    head = "| protocol | conc | variant | server | rows/s median [min-max] |" + (" ratio |" if ceiling else "") + \
        " server CPU-us/req | mean batch | p50 ms | p99 ms |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (protocol, conc, variant, server), rows in groups.items():
        rate = [r["rows_per_s"] for r in rows]
        ratio = f" {med(rate) / ceiling:.2f} |" if ceiling else ""
        batch = [r["server"]["mean_batch_size"] for r in rows if (r.get("server") or {}).get("mean_batch_size")]
        lines.append(f"| {protocol} | {conc} | {variant} | {server} | {med(rate):.0f} [{min(rate):.0f}-{max(rate):.0f}] |"
                     f"{ratio} {med([r['server_cpu_us_per_req'] or 0 for r in rows]):.0f} |"
                     f" {med(batch) if batch else 0:.1f} | {med([r['p50_ms'] or 0 for r in rows]):.2f} |"
                     f" {med([r['p99_ms'] or 0 for r in rows]):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, required=True, help="a built model repository (read only)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--variants", default="fixed:3000,adaptive:3000,fixed:0,zoo")
    p.add_argument("--servers", default="default", help="label[:MODELSERVE_K=V;...],... one server each")
    p.add_argument("--concurrency", default="32")
    p.add_argument("--protocols", default="binary")
    p.add_argument("--client", choices=benchmatrix.CLIENTS, default="h2load")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=float, default=5.0, help="per cell")
    p.add_argument("--ceiling-seconds", type=float, default=1.0,
                   help="per batch size of the in-process ceiling measured first (0: none, no ratio column)")
    p.add_argument("--output", type=Path, default=Path("dispatch_ab"))
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    servers_spec = parse_servers(args.servers)
    levels = [(proto, int(c)) for c in args.concurrency.split(",") for proto in args.protocols.split(",")]
    cell_args = argparse.Namespace(requests=10**7, time_cap=args.seconds)
    cells: list[dict[str, Any]] = []
    ceiling = None
    if args.ceiling_seconds > 0:  # `loadtests.bench`'s own ceiling: batches 1-64, CPU
        best = bench_ceiling(args.zoo / args.model / "1" / "model.onnx",
                             argparse.Namespace(ceiling_seconds=args.ceiling_seconds, provider="cpu"))["best"]
        ceiling = best["rows_per_s"]
        print(f"in-process ceiling: {ceiling:.0f} rows/s at batch {best['batch']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="modelserve-dispatch-ab-") as tmp, contextlib.ExitStack() as stack:
        repo = Path(tmp) / "repo"
        write_repo(repo, zoo=args.zoo, model=args.model, variants=variants)
        grpc = "grpc" in args.protocols.split(",")
        servers = [(label, stack.enter_context(serve(repo, log_path=args.output / f"server-{label}.log", env=env,
                                                     grpc=grpc)))
                   for label, env in servers_spec]
        total = args.rounds * len(levels) * len(variants) * len(servers)
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for protocol, conc in levels:
                for variant in variants:
                    for label, server in order:
                        row = asyncio.run(benchmatrix._cell(server, model=variant_name(variant), protocol=protocol,
                                                            concurrency=conc, args=cell_args, client=args.client))
                        cells.append({"round": r, "protocol": protocol, "concurrency": conc, "variant": variant,
                                      "label": label, **row})
                        print(f"[{len(cells)}/{total}] round {r} {protocol} c{conc} {variant:13s} {label:8s} "
                              f"{row['rows_per_s']:7.0f} rows/s  server {row['server_cpu_us_per_req'] or 0:5.0f} "
                              f"CPU-us/req  p50 {row['p50_ms'] or 0:.2f} ms", flush=True)
    text = table(cells, ceiling=ceiling)
    if ceiling:
        text += f"\n\nratio = rows/s over the in-process ceiling measured first in this run: {ceiling:.0f} rows/s."
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "dispatch_ab.md").write_text(text + "\n")
    (args.output / "dispatch_ab.json").write_text(json.dumps(cells, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
