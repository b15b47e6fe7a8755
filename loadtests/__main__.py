"""`python -m loadtests`: drive a KServe V2 HTTP server and report throughput, latency and the queue/compute split.

    python -m loadtests --url 127.0.0.1:8000 --model cnn --protocol json,binary --concurrency 1,8,32
        --requests 2000 --output results.json

Exit status 1 when any request failed (so scripts and CI cannot miss errors), 2 when the run could not
start (server unreachable, unknown model, inputs that need --shape).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from loadtests.generator import LoadConfig, Target, run_sync
from loadtests.payloads import PROTOCOLS
from loadtests.report import render_table, summarize, write_json


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _protocols(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in PROTOCOLS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"protocol must be json, binary, grpc or a list (json,binary), got {text!r}")
    return values


def _shape(text: str) -> tuple[str, list[int]]:
    name, _, dims = text.partition("=")
    try:
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=d1,d2,... (dims without the batch dim), got {text!r}") from None


def _npy(text: str) -> tuple[str, Path]:
    name, sep, path = text.rpartition("=")
    return (name if sep else ""), Path(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8000", help="server address, host:port or http://host:port")
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--model-version", help="model version (default: the server's choice)")
    p.add_argument("--protocol", type=_protocols, default=["json"], help="json, binary, grpc or a list: json,binary")
    p.add_argument("--grpc-url", help="the server's gRPC host:port (needed for --protocol grpc)")
    p.add_argument("--concurrency", type=_int_list, default=[1, 8, 32], help="in-flight requests, e.g. 1,8,32")
    p.add_argument("--requests", type=int, default=1000, help="measured requests per concurrency level")
    p.add_argument("--batch", type=int, default=1, help="rows per request (models with max_batch_size > 0)")
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds per level before it stops early")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout in seconds")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests per level (default max(2*conc, 16))")
    p.add_argument("--shape", type=_shape, action="append", default=[], metavar="NAME=d1,d2",
                   help="dims (without the batch dim) for an input with dynamic dims; repeat per input")
    p.add_argument("--input-npy", type=_npy, action="append", default=[], metavar="[NAME=]FILE",
                   help="send this array instead of random data (full shape, or one row repeated to --batch)")
    p.add_argument("--int-high", type=int, default=10, help="random integers are drawn from [0, INT_HIGH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.requests < 1 or args.batch < 1 or args.time_cap <= 0 or args.timeout <= 0:
        p.error("--requests and --batch must be >= 1; --time-cap and --timeout must be > 0")
    return args


def _npy_files(pairs: list[tuple[str, Path]]) -> dict[str, Path]:
    # A bare FILE is kept under "" and bound to the model's only input once metadata is known.
    return {name: path for name, path in pairs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = LoadConfig(
        target=Target(args.url, args.model, args.model_version, grpc_url=args.grpc_url),
        protocols=args.protocol, concurrencies=args.concurrency, requests=args.requests, batch=args.batch,
        time_cap_s=args.time_cap, timeout_s=args.timeout, warmup=args.warmup, shape_overrides=dict(args.shape),
        npy_files=_npy_files(args.input_npy), int_high=args.int_high, seed=args.seed, progress=not args.no_progress,
    )
    console = Console()
    try:
        _, results = run_sync(cfg)
    except (ValueError, RuntimeError, OSError) as exc:
        console.print(f"[red]loadtests: {exc}[/red]")
        return 2
    rows = [summarize(r) for r in results]
    render_table(rows, title=f"{args.model} @ {args.url}, batch {args.batch}")
    if args.output:
        write_json(args.output, {"url": args.url, "model": args.model, "batch": args.batch, "levels": rows})
        console.print(f"wrote {args.output}")
    failed = sum(r["errors"] + r["warmup_errors"] for r in rows)
    if failed:
        console.print(f"[red]{failed} request(s) failed[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
