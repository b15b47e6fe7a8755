"""PNG and WAV jobs of `modelserve predict` against their ceiling, interleaved round by round, with CPU per row.

On a shared machine the wall-clock ceiling moves several-fold from one minute to the next, so every round runs
the ceiling (ONNX Runtime alone on the same collated batches, as `loadtests.offline_bench`) and then `predict`
with each `--workers` value, and the ratio is taken within the round. CPU-µs per row is the process's CPU time
(all threads, and the decode workers once joined) over the rows: it is what two cores have to share, and it
moves far less with other people's load than wall time does. `prepare` is the family's preparation alone
(decode + layout/read, one thread, rows already in memory).

    python -m loadtests.offline_media_bench --model-repository ZOO --rows 2000 --rounds 5 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from loadtests.offline_bench import make_input
from service.offline import cli
from service.offline.engine import load_model
from service.offline.prepare import prepare_rows
from service.offline.readers import open_input

CASES = {"cnn": "png", "speech": "wav"}


def cpu_s() -> float:
    """CPU seconds of this process (all threads) and its joined children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def ceiling(model_dir: Path, *, src: Path, batch_size: int) -> dict:
    """Wall rows/s and CPU-µs/row of session.run alone over predict's batches, and the preparation's CPU-µs/row."""
    model = load_model(model_dir)
    items = [it for it in open_input(src, task=model.processor.task).items if it.error is None]
    t0 = time.process_time()
    ready = [p for s in range(0, len(items), batch_size) for p, _ in prepare_rows(model.processor,
                                                                                   items[s:s + batch_size])]
    prepare_us = 1e6 * (time.process_time() - t0) / len(items)
    batches = [model.processor.collate(ready[s:s + batch_size]) for s in range(0, len(ready), batch_size)]
    model.session.run(model.output_names, batches[0])  # warm-up, as predict's first batch pays for it
    c0, t0 = time.process_time(), time.perf_counter()
    for feeds in batches:
        model.session.run(model.output_names, feeds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"rows_s": len(items) / wall, "cpu_us": 1e6 * cpu / len(items), "prepare_us": prepare_us}


def predict(model: str, *, repo: Path, src: Path, out: Path, batch_size: int, workers: int, rows: int) -> dict:
    args = cli.parse_args(["--model", model, "--input", str(src), "--output", str(out), "--model-repository",
                           str(repo), "--batch-size", str(batch_size), "--workers", str(workers)])
    c0 = cpu_s()
    rate = cli.run(args).rows_per_s
    return {"rows_s": rate, "cpu_us": 1e6 * (cpu_s() - c0) / rows}


def bench(model: str, *, args: argparse.Namespace, tmp: Path) -> list[dict]:
    root = tmp / model
    root.mkdir()
    src = make_input(CASES[model], root=root, rows=args.rows)
    rounds = []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        top = ceiling(args.model_repository / model, src=src, batch_size=args.batch_size)
        row = {"model": model, "input": CASES[model], "round": r, "load": load, "ceiling": top}
        for workers in args.workers:
            out = root / f"out-{r}-{workers}.parquet"
            got = predict(model, repo=args.model_repository, src=src, out=out, batch_size=args.batch_size,
                          workers=workers, rows=args.rows)
            row[f"workers={workers}"] = {**got, "fraction": got["rows_s"] / top["rows_s"]}
        rounds.append(row)
    return rounds


def summary(rounds: list[dict], workers: list[int]) -> list[str]:
    """One markdown row per (model, workers): medians over rounds (fraction taken within each round)."""
    med = statistics.median
    lines = ["| model | input | --workers | predict rows/s | ceiling rows/s | fraction (median [min-max]) | "
             "predict CPU-µs/row | ORT CPU-µs/row | prepare CPU-µs/row | load avg |", "|" + "---|" * 10]
    for model in dict.fromkeys(r["model"] for r in rounds):
        mine = [r for r in rounds if r["model"] == model]
        for w in workers:
            cells = [r[f"workers={w}"] for r in mine]
            fractions = [c["fraction"] for c in cells]
            lines.append(f"| {model} | {mine[0]['input']} | {w} | {med(c['rows_s'] for c in cells):.0f} | "
                         f"{med(r['ceiling']['rows_s'] for r in mine):.0f} | {med(fractions):.2f} "
                         f"[{min(fractions):.2f}-{max(fractions):.2f}] | {med(c['cpu_us'] for c in cells):.0f} | "
                         f"{med(r['ceiling']['cpu_us'] for r in mine):.0f} | "
                         f"{med(r['ceiling']['prepare_us'] for r in mine):.0f} | "
                         f"{min(r['load'] for r in mine):.1f}-{max(r['load'] for r in mine):.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.offline_media_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default="cnn,speech", help="comma-separated subset of " + ",".join(CASES))
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", default="1,2", help="comma-separated --workers values to compare")
    p.add_argument("--out", type=Path, default=Path("bench_results/offline_media.json"))
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in CASES or not (args.model_repository / m).is_dir()]
    if unknown:
        p.error(f"no model {unknown} of {sorted(CASES)} in {args.model_repository}")
    with tempfile.TemporaryDirectory(prefix="media-bench-") as tmp:
        rounds = [r for m in models for r in bench(m, args=args, tmp=Path(tmp))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rounds, indent=2))
    print("\n".join(summary(rounds, args.workers)))
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
