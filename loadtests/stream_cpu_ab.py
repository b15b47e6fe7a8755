"""Server CPU per streamed request, this checkout against another, interleaved: `python -m
loadtests.stream_cpu_ab --code-root OTHER_CHECKOUT [--requests 4000] [--rounds 3]`.

Both servers run the same one-model repository (`double`, tests/onnx_builders.py) with gRPC; each round
sends `--requests` requests on one ModelStreamInfer stream (at most `--window` unanswered) to one server, then
the other, and reads the server process's CPU time (utime + stime) around it. Prints CPU microseconds per
request and requests per second for each, per round, and the median ratio (this / other). CPU per request is
steadier than throughput on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from loadtests.serverproc import REPO_ROOT, serve
from tests.onnx_builders import scale_model

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def one_round(grpc_url: str, pid: int, *, requests: int, window: int) -> tuple[float, float]:
    """(server CPU µs per request, requests per second) for one stream of `requests`."""
    slots, done = threading.Semaphore(window), threading.Event()
    answered = [0]

    def callback(result: object, error: object) -> None:
        answered[0] += 1
        slots.release()
        if answered[0] == requests:
            done.set()

    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=callback)
    x = np.ones((1, 4), np.float32)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for _ in range(requests):
        slots.acquire()
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        client.async_stream_infer("double", [inp])
    done.wait(300)
    wall, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
    client.stop_stream()
    client.close()
    return cpu / requests * 1e6, requests / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code-root", type=Path, required=True, help="the other checkout (e.g. the commit before)")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        scale_model(repo / "double" / "1" / "model.onnx", factor=2.0)
        (repo / "double" / "config.pbtxt").write_text("max_batch_size: 0\n")
        with serve(repo, log_path=Path(tmp) / "this.log", grpc=True) as this, \
                serve(repo, log_path=Path(tmp) / "other.log", grpc=True, code_root=a.code_root.resolve()) as other:
            ratios = []
            for r in range(a.rounds):
                got = {}
                for name, server in (("this", this), ("other", other)) if r % 2 == 0 else (("other", other),
                                                                                          ("this", this)):
                    got[name] = one_round(server.grpc_url or "", server.pid, requests=a.requests, window=a.window)
                ratios.append(got["this"][0] / got["other"][0])
                print(f"round {r + 1}: this {got['this'][0]:.0f} µs CPU/req, {got['this'][1]:.0f} req/s; "
                      f"other {got['other'][0]:.0f} µs CPU/req, {got['other'][1]:.0f} req/s", flush=True)
            print(f"CPU per request, this / other: median {statistics.median(ratios):.3f} "
                  f"(rounds {', '.join(f'{x:.3f}' for x in ratios)}); this checkout: {REPO_ROOT}")


if __name__ == "__main__":
    main()
