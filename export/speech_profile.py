"""Where a speech graph spends its time, node by node: ``python -m export.speech_profile GRAPH.onnx ...``.

ONNX Runtime's profiler (``enable_profiling``) on one session per graph, waveform batches of one-second
noise, one intra-op thread by default; per node of the graph as ORT ran it (after fusions), the median
kernel time over ``--repeats`` runs, each node marked front end (waveform -> log-mel, found by
export/speech_split.py's graph analysis on the same graph) or network. Prints a table per graph and batch
size and the front end's share ``f`` of the kernel time, the number in ratio = f + r * (1 - f).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from export import speech_split
from service.modelrepo.sessions import session_options
from service.processing.logmel import SAMPLE_RATE


def node_times(path: Path, wave: np.ndarray, *, threads: int, repeats: int) -> dict[str, tuple[str, float]]:
    """Node name -> (op type as run, median kernel µs per run) over ``repeats`` runs after one warm-up.
    Medians, not means: on a shared machine one preempted run would otherwise swamp a small node."""
    with tempfile.TemporaryDirectory() as tmp:
        # NOTE: its own session, not create_session: profiling must never be a serving option.
        options = session_options(threads=threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        for _ in range(repeats + 1):
            session.run(None, {speech_split.WAVEFORM: wave})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, tuple[str, list[float]]] = {}
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            name = event["name"].removesuffix("_kernel_time")
            per_node.setdefault(name, (event["args"]["op_name"], []))[1].append(float(event["dur"]))
    # Each node's first run is the warm-up.
    return {name: (op, float(np.median(durations[1:] or durations))) for name, (op, durations) in per_node.items()}


def split(path: Path, times: dict[str, tuple[str, float]]) -> dict[str, str]:
    """Node name -> "front end" or "network". ORT renames fused nodes, so a node counts as front end when
    its name is (or starts with) a front-end node's name of the graph on disk."""
    front = speech_split.frontend_nodes(onnx.load(str(path)).graph)
    return {name: "front end" if name.split("/")[0] in front else "network"
            for name in times}


def profile(path: Path, *, batches: list[int], threads: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"graph": str(path), "threads": threads, "repeats": repeats,
                           "load_average": os.getloadavg()[0], "batches": {}}
    for batch in batches:
        wave = (0.1 * rng.standard_normal((batch, SAMPLE_RATE))).astype(np.float32)
        times = node_times(path, wave, threads=threads, repeats=repeats)
        part = split(path, times)
        total = sum(us for _, us in times.values())
        front = sum(us for name, (_, us) in times.items() if part[name] == "front end")
        nodes = sorted(((name, op, part[name], us) for name, (op, us) in times.items()), key=lambda r: -r[3])
        out["batches"][batch] = {"total_us": total, "front_us": front, "front_share": front / total,
                                 "nodes": nodes}
    out["load_average_end"] = os.getloadavg()[0]
    return out


def markdown(result: dict[str, Any], *, top: int) -> str:
    lines = [f"{result['graph']}: ORT {ort.__version__}, {result['threads']} intra-op thread(s), median of "
             f"{result['repeats']} runs, load average {result['load_average']:.2f} -> {result['load_average_end']:.2f}"]
    for batch, b in result["batches"].items():
        lines += ["", f"batch {batch}: kernel time {b['total_us'] / 1e3:.2f} ms, front end {b['front_us'] / 1e3:.2f} ms "
                  f"(f = {b['front_share']:.2f})", "", "| node | op (as run) | part | µs | share |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {op} | {part} | {us:.0f} | {us / b['total_us']:.3f} |"
                  for name, op, part, us in b["nodes"][:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.speech_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("graphs", type=Path, nargs="+", help="speech graphs with a waveform input")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=15, help="nodes listed per table")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or min(args.batches) < 1:
        parser.error("--threads, --repeats and --batches must be at least 1")
    for path in args.graphs:
        print(markdown(profile(path, batches=args.batches, threads=args.threads, repeats=args.repeats), top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
