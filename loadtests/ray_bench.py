"""`modelserve predict --engine ray` against `--engine local`, side by side in one run, on a Ray cluster this
command starts itself (a head and one worker on 127.0.0.1) and stops afterwards.

Each case (cnn on a .npy, a text model on JSONL) runs twice per engine: a small job (`--warm-rows`) and the
full one (`--rows`). The full job's wall time divided into its rows is rows/s *including* the fixed start cost
(engine set-up, actor start, model load); the difference of the two jobs, (rows - warm_rows) / (t_full - t_small),
is the steady rate *excluding* it, and t_small - warm_rows / steady is the fixed cost itself.

    python -m loadtests.ray_bench --model-repository /tmp/tz --rows 6144
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadtests.offline_bench import make_input

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = [("cnn", "npy"), ("transformer-classifier", "jsonl")]
HEAD = ["model", "input", "rows", "engine", "small_s", "full_s", "rows_s_incl_start", "rows_s_excl_start", "start_s",
        "ray_vs_local_excl", "ray_vs_local_incl"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    # Two nodes on one host: every per-node port must differ, and differ from any other Ray on the machine.
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{name}={_free_port()}" for name in names]


def _ray_cli() -> str:
    path = Path(sys.executable).with_name("ray")
    found = str(path) if path.exists() else shutil.which("ray")
    if not found:
        raise SystemExit("the `ray` CLI is not installed: pip install 'modelserve[ray]'")
    return found


def _nodes(address: str, env: dict) -> int:
    done = subprocess.run([_ray_cli(), "status", f"--address={address}"], capture_output=True, text=True,
                          timeout=30, env=env)
    if done.returncode != 0:
        return 0
    return done.stdout.split("Active:")[-1].split("Pending:")[0].count("node_")


def _wait_nodes(address: str, env: dict, *, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _nodes(address, env) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the Ray cluster at {address} did not reach {count} node(s) in {timeout:.0f} s")
        time.sleep(0.5)  # polling `ray status`; each call itself takes ~1 s


@contextmanager
def cluster(*, head_cpus: int, worker_cpus: int, logs: Path) -> Iterator[str]:
    """A head and one worker on loopback, stopped by their process ids (never `ray stop`, which would stop any
    other Ray on the machine); yields the GCS address. Token auth with a fresh token, as Ray clusters run."""
    address = f"127.0.0.1:{_free_port()}"
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                       "RAY_USAGE_STATS_ENABLED": "0"})
    env = dict(os.environ)
    common = ["--block", "--node-ip-address=127.0.0.1", "--object-store-memory=300000000"]
    head = [_ray_cli(), "start", "--head", f"--port={address.split(':')[1]}", f"--num-cpus={head_cpus}",
            "--include-dashboard=false", f"--ray-client-server-port={_free_port()}", *common, *_node_ports()]
    worker = [_ray_cli(), "start", f"--address={address}", f"--num-cpus={worker_cpus}", *common, *_node_ports()]
    procs: list[subprocess.Popen] = []
    try:
        for cmd, name, count in ((head, "head", 1), (worker, "worker", 2)):
            procs.append(subprocess.Popen(cmd, stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True))
            _wait_nodes(address, env, count=count)
        yield address
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        _forget(address)


def _forget(address: str) -> None:
    """Remove Ray's "current cluster" file when it names our stopped head (as `ray stop` does), so a later
    `ray.init()` on this machine does not try to join the dead cluster."""
    # NOTE: ray is an optional extra, imported only once a cluster ran.
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    if path.exists() and path.read_text().strip().endswith(":" + address.split(":")[1]):
        path.unlink(missing_ok=True)


def _job(model: str, *, repo: Path, src: Path, out: Path, rows: int, engine: str, batch_size: int,
         address: str | None) -> float:
    """Wall seconds of one whole `modelserve predict` job, run as a user runs it: a fresh process, so each
    job pays the same fixed cost (imports, joining the cluster, actor start, model load)."""
    cmd = [sys.executable, "-m", "service.cli", "predict", "--model", model, "--input", str(src), "--output",
           str(out), "--model-repository", str(repo), "--batch-size", str(batch_size), "--max-rows", str(rows),
           "--engine", engine]
    if address:
        cmd += ["--ray-address", address]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1800)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or f"rows ok: {rows}," not in done.stderr:
        raise SystemExit(f"{model} on {engine} ({rows} rows) failed:\n{done.stderr[-3000:]}")
    return seconds


def measure(model: str, *, kind: str, rows: int, args: argparse.Namespace, root: Path,
            address: str | None) -> list[dict]:
    src = make_input(kind, root=root, rows=rows)
    found: dict[str, dict] = {}
    for engine in ("local", "ray"):
        small = _job(model, repo=args.model_repository, src=src, out=root / f"{engine}-small.parquet",
                     rows=args.warm_rows, engine=engine, batch_size=args.batch_size, address=address)
        full = _job(model, repo=args.model_repository, src=src, out=root / f"{engine}-full.parquet",
                    rows=rows, engine=engine, batch_size=args.batch_size, address=address)
        found[engine] = {"model": model, "input": kind, "rows": rows, "engine": engine,
                         "rows_s_incl_start": round(rows / full, 1), "full_s": round(full, 2),
                         "small_s": round(small, 2)}
        # The extra rows must take clearly longer than the start cost varies; else the split is noise.
        if full - small > 0.05 * full:
            steady = (rows - args.warm_rows) / (full - small)
            found[engine]["rows_s_excl_start"] = round(steady, 1)
            found[engine]["start_s"] = round(max(small - args.warm_rows / steady, 0.0), 2)
    for key in ("excl", "incl"):
        ray_rate, local_rate = found["ray"].get(f"rows_s_{key}_start"), found["local"].get(f"rows_s_{key}_start")
        if ray_rate and local_rate:
            found["ray"][f"ray_vs_local_{key}"] = round(ray_rate / local_rate, 3)
    return [found["local"], found["ray"]]


def report(results: list[dict], *, out_dir: Path, note: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"modelserve predict: local vs Ray ({note})")
    lines = [f"<!-- {note} -->", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for h in HEAD:
        table.add_column(h)
    for r in results:
        cells = [str(r.get(h, "-" if r["engine"] == "local" and h.startswith("ray_vs") else "n/a")) for h in HEAD]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    (out_dir / "ray_bench.md").write_text("\n".join(lines) + "\n")
    (out_dir / "ray_bench.json").write_text(json.dumps({"note": note, "results": results}, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.ray_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--rows", type=int, default=32768, help="rows of the full cnn .npy job (default 32768)")
    p.add_argument("--text-rows", type=int, default=6144, help="rows of the full text JSONL job (default 6144)")
    p.add_argument("--warm-rows", type=int, default=512, help="rows of the small job that prices start-up")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--head-cpus", type=int, default=1)
    p.add_argument("--worker-cpus", type=int, default=2)
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(m for m, _ in CASES))
    p.add_argument("--out-dir", type=Path, default=Path("bench_results"))
    args = p.parse_args(argv)
    if not 0 < args.warm_rows < min(args.rows, args.text_rows):
        p.error(f"--warm-rows must be between 1 and the smaller of --rows and --text-rows minus 1, got "
                f"{args.warm_rows}")
    wanted = set(args.models.split(",")) if args.models else {m for m, _ in CASES}
    cases = [(m, k) for m, k in CASES if m in wanted and (args.model_repository / m).is_dir()]
    if not cases:
        p.error(f"none of {sorted(wanted)} in {args.model_repository}; build a zoo first (`modelserve build`)")
    note = (f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; cluster head {args.head_cpus} CPU + worker {args.worker_cpus} CPUs on "
            f"127.0.0.1; batch {args.batch_size}; small job {args.warm_rows} rows")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        with cluster(head_cpus=args.head_cpus, worker_cpus=args.worker_cpus, logs=Path(tmp)) as address:
            for model, kind in cases:
                root = Path(tmp) / model
                root.mkdir()
                rows = args.rows if kind == "npy" else args.text_rows
                results += measure(model, kind=kind, rows=rows, args=args, root=root, address=address)
    report(results, out_dir=args.out_dir, note=f"{note}; load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
