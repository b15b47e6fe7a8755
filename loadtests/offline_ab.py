"""Two checkouts' `modelserve predict` against the ONNX Runtime ceiling, interleaved in fresh processes.

On a shared machine the ceiling moves several-fold from one minute to the next, so each round runs one process
per checkout (the order alternating round by round); each process runs one warm job, then `--pairs` pairs of
(ceiling, predict job) and the fraction is taken within its pair. Besides `predict`'s rows/s (its own timed
window, as `loadtests.offline_bench` reports it), the whole job's wall time (model load, checks, listing,
assembly) and its process CPU per row. The child runs this file with the checkout's code on PYTHONPATH, so a
checkout that predates this tool (`git archive <commit> | tar -x -C DIR`) can be measured too.

    python -m loadtests.offline_ab --before /tmp/old --after . --model-repository ZOO --model speech \
        --input wavs/ --rounds 6 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> None:
    """In the checkout's process: one warm job, then the pairs, one JSON line each."""
    # NOTE: imported here, from whichever checkout is on PYTHONPATH (the parent imports neither).
    from loadtests.offline_bench import ceiling
    from service.offline import cli

    out = Path(tempfile.mkdtemp(prefix="offline-ab-"))

    def job(i: int) -> tuple[float, float, float, int]:
        parsed = cli.parse_args(["--model", args.model, "--input", str(args.input), "--output",
                                 str(out / f"o{i}.parquet"), "--model-repository", str(args.model_repository),
                                 "--batch-size", str(args.batch_size)])
        c0, t0 = _cpu_s(), time.perf_counter()
        summary = cli.run(parsed)
        return summary.rows_per_s, time.perf_counter() - t0, _cpu_s() - c0, summary.ok + summary.failed

    try:
        job(-1)
        for i in range(args.pairs):
            top = ceiling(args.model_repository / args.model, src=args.input, batch_size=args.batch_size)
            rate, wall, cpu, rows = job(i)
            print(json.dumps({"ceiling": top, "predict": rate, "job_s": wall, "cpu_us": 1e6 * cpu / max(rows, 1),
                              "fraction": rate / top, "load": os.getloadavg()[0]}), flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _run(tree: Path, args: argparse.Namespace) -> list[dict]:
    cmd = ["nice", "-n", str(args.nice), sys.executable, str(Path(__file__).resolve()), "--child",
           "--model-repository", str(args.model_repository.resolve()), "--model", args.model,
           "--input", str(args.input.resolve()), "--pairs", str(args.pairs), "--batch-size", str(args.batch_size)]
    done = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree.resolve())},
                          capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not rows:
        raise SystemExit(f"{tree}: the job failed\n{done.stderr[-2000:]}")
    return rows


def summary(name: str, rows: list[dict]) -> str:
    med, fractions = statistics.median, sorted(r["fraction"] for r in rows)
    return (f"| {name} | {len(rows)} | {med(fractions):.2f} [{fractions[0]:.2f}-{fractions[-1]:.2f}] | "
            f"{med(r['predict'] for r in rows):.0f} | {med(r['ceiling'] for r in rows):.0f} | "
            f"{1e3 * med(r['job_s'] for r in rows):.0f} | {med(r['cpu_us'] for r in rows):.1f} | "
            f"{min(r['load'] for r in rows):.1f}-{max(r['load'] for r in rows):.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.offline_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, help="checkout (folder) measured first in even rounds")
    p.add_argument("--after", type=Path, help="the other checkout")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--input", type=Path, required=True, help="the job's input (e.g. from offline_bench.make_input)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pairs", type=int, default=2, help="(ceiling, predict) pairs per process")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.before is None or args.after is None:
        p.error("--before and --after are required")
    trees = {"before": args.before, "after": args.after}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (["before", "after"] if r % 2 == 0 else ["after", "before"]):
            results[name] += _run(trees[name], args)
    print("| checkout | pairs | fraction median [min-max] | predict rows/s | ceiling rows/s | job wall ms | "
          "CPU-µs/row | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        print(summary(name, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
