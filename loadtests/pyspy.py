"""Profile the server's per-request Python costs with py-spy while the load generator drives it.

    .venv/bin/python -m loadtests.pyspy --output bench_results/profile            # bench CNN, batching ON
    .venv/bin/python -m loadtests.pyspy --repository DIR --model NAME --output ...  # any model

py-spy samples the running server from outside (no code change, works on uvloop); we keep its raw
collapsed stacks (open them in https://speedscope.app) and summarize the event-loop thread, the one
that parses, routes and answers every request, as microseconds of that thread per request.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadtests.bench import write_repository
from loadtests.benchmodel import DEFAULT_WIDTH, build_cnn_onnx
from loadtests.generator import LoadConfig, Target, run_sync
from loadtests.report import summarize
from loadtests.serverproc import serve

GROUPS = {
    "service": re.compile(r"\(service/"),
    "fastapi/starlette/uvicorn": re.compile(r"\((fastapi|starlette|uvicorn)/"),
}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def parse_collapsed(path: Path, *, thread: str) -> tuple[Counter[str], Counter[str], int]:
    """(inclusive samples, self samples, total) per 'function (file)' for one thread of py-spy's raw output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or thread not in frames[0]:
            continue
        n = int(count)
        total += n
        names = [f"{m['func']} ({m['file']})" if (m := _FRAME.match(f)) else f for f in frames[1:]]
        inclusive.update({name: n for name in set(names)})  # a recursive frame counts once per sample
        if names:
            own[names[-1]] += n
    return inclusive, own, total


def _table(title: str, counts: Counter[str], *, pattern: re.Pattern | None, us_per_sample: float,
           total: int, top: int) -> Table:
    table = Table(title=title)
    table.add_column("% of loop", justify="right")
    table.add_column("µs / request", justify="right")
    table.add_column("function (file)")
    # Frames on every sample (cli.main, Server.run, ...) are the process's root, not per-request costs.
    rows = [(k, v) for k, v in counts.most_common() if v < total and (pattern is None or pattern.search(k))][:top]
    for name, n in rows:
        table.add_row(f"{100 * n / total:.1f}", f"{n * us_per_sample:.0f}", name)
    return table


def summarize_profile(path: Path, *, requests: int, rate: int, console: Console, top: int = 25) -> None:
    inclusive, own, total = parse_collapsed(path, thread="MainThread")
    if not total:
        raise RuntimeError(f"{path}: no MainThread samples; was py-spy attached to the server?")
    us_per_sample = 1e6 / rate / max(requests, 1)  # one sample is 1/rate s of the loop thread
    console.print(f"event-loop thread busy in {total} samples at {rate} Hz: "
                  f"{total * us_per_sample:.0f} µs of loop time per request over {requests} requests. "
                  "Runnable-but-descheduled time counts as busy, so on a shared box read the % column; "
                  "'Runner.run' self time is uvloop's own C code (epoll, socket reads, callbacks).")
    for group, pattern in GROUPS.items():
        console.print(_table(f"inclusive, {group}", inclusive, pattern=pattern, us_per_sample=us_per_sample,
                             total=total, top=top))
    console.print(_table("self time (where the loop thread actually was)", own, pattern=None,
                         us_per_sample=us_per_sample, total=total, top=top))


def _bench_repository(tmp: Path) -> tuple[Path, str]:
    onnx_path = build_cnn_onnx(tmp / "cnn.onnx", width=DEFAULT_WIDTH)
    write_repository(tmp / "repo", onnx_path=onnx_path, delay_us=200)
    return tmp / "repo", "cnn_dynamic"


def profile(args: argparse.Namespace, console: Console) -> None:
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy not found; install the test extra: pip install -e '.[test]'")
    args.output.mkdir(parents=True, exist_ok=True)
    raw = args.output / "pyspy_raw.txt"
    with tempfile.TemporaryDirectory(prefix="modelserve-prof-") as tmp:
        repo, model = (args.repository, args.model) if args.repository else _bench_repository(Path(tmp))
        with serve(repo, log_path=args.output / "server.log", grpc=args.protocol == "grpc") as server:
            cmd = [pyspy, "record", "--pid", str(server.pid), "--rate", str(args.rate), "--duration",
                   str(args.seconds), "--format", "raw", "--threads", "--output", str(raw)]
            if args.native:
                cmd.append("--native")  # C/Cython frames too: where "Runner.run" self time goes
            # The load runs a second past py-spy's window so the server is under load for all of it.
            with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as spy:
                cfg = LoadConfig(target=Target(server.url, model, grpc_url=server.grpc_url), protocols=[args.protocol],
                                 concurrencies=[args.concurrency], requests=10**7, time_cap_s=args.seconds + 1,
                                 progress=False)
                _, (level,) = run_sync(cfg)
                _, err = spy.communicate(timeout=60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-2000:]}")
    summary = summarize(level)
    console.print(f"load: {summary['requests_per_s']:.0f} req/s, p50 {summary['p50_ms']:.2f} ms, "
                  f"{summary['errors']} errors; raw stacks in {raw}")
    summarize_profile(raw, requests=round(summary["requests_per_s"] * args.seconds), rate=args.rate,
                      console=console)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.pyspy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("bench_results/profile"))
    p.add_argument("--repository", type=Path, help="model repository to serve (default: the bench CNN)")
    p.add_argument("--model", help="model to load (with --repository)")
    p.add_argument("--protocol", choices=["json", "binary", "grpc"], default="binary")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=int, default=8, help="py-spy recording window")
    p.add_argument("--rate", type=int, default=200, help="samples per second")
    p.add_argument("--native", action="store_true", help="sample native (C, Cython) frames too")
    p.add_argument("--summarize", type=Path, help="only summarize an existing raw file (needs --requests)")
    p.add_argument("--requests", type=int, default=0, help="requests served during --summarize's recording")
    args = p.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160, record=True)
    if args.summarize:
        summarize_profile(args.summarize, requests=args.requests, rate=args.rate, console=console)
    elif bool(args.repository) != bool(args.model):
        p.error("--repository and --model go together")
    else:
        profile(args, console)
    args.output.mkdir(parents=True, exist_ok=True)
    console.save_text(str(args.output / "summary.txt"))  # the tables above, for the record
    return 0


if __name__ == "__main__":
    sys.exit(main())
