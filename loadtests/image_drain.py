"""Stop a running container the way Kubernetes stops a pod while clients keep sending, and count the answers.

Client threads send V2 infer requests without pause over tritonclient http, grpc and grpc streams. Then the chart's
preStop command runs in the container (`exec`), and `stop` sends SIGTERM with SIGKILL due at what is left of
terminationGracePeriodSeconds. Each request ends as one of:

- `ok`: answered 200 / OK;
- `refused`: answered with a clear refusal (503, gRPC UNAVAILABLE from a server that is draining) or never
  accepted (connection refused, the port already closed) -- the client knows it was not served;
- `lost`: sent and never answered (connection reset or closed after the request was written; a stream
  ended without answering a request it took). The check wants none;
- unary gRPC calls answered CANCELLED at shutdown are counted apart (gRPC core cancels calls that reached the
  server but no handler yet: grpc/grpc#41785).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

CANCELLED_BY_CORE = "cancelled before a handler (grpc/grpc#41785)"
# Substrings of client errors that mean the request never reached a server that accepted it.
NOT_ACCEPTED = ("connection refused", "failed to connect", "connect failed", "connection attempt timed out",
                "errno 111", "connectionrefused", "503", "not ready", "shutting down", "deadline_exceeded")


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    after_signal: Counter = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)
    refusals: Counter = field(default_factory=Counter)  # kinds of refusal (first 80 characters), for the report
    lock: threading.Lock = field(default_factory=threading.Lock)

    signal_at: float | None = None

    def add(self, outcome: str, *, signalled: bool, detail: str = "") -> None:
        if outcome == "lost" and self.signal_at is not None:
            detail = f"{time.monotonic() - self.signal_at:+.1f} s after SIGTERM: {detail}"
        with self.lock:
            self.counts[outcome] += 1
            if signalled:
                self.after_signal[outcome] += 1
            if outcome == "lost" and len(self.lost_examples) < 5:
                self.lost_examples.append(detail[:200])
            if outcome == "refused":
                self.refusals[re.sub(r"\d+", "N", detail)[:80]] += 1


def _classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    return "refused" if any(s in text for s in NOT_ACCEPTED) else "lost"


def _image() -> np.ndarray:
    return np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)


def _http_loop(url: str, *, model: str, tally: Tally, stop: threading.Event, signalled: threading.Event) -> None:
    data = _image()
    while not stop.is_set():
        try:
            client = httpclient.InferenceServerClient(url, connection_timeout=2.0, network_timeout=60.0)
        except Exception as exc:
            tally.add("refused", signalled=signalled.is_set(), detail=str(exc))
            time.sleep(0.05)
            continue
        with client:
            while not stop.is_set():
                inp = httpclient.InferInput("image", list(data.shape), "FP32")
                inp.set_data_from_numpy(data, binary_data=True)
                try:
                    client.infer(model, [inp])
                    tally.add("ok", signalled=signalled.is_set())
                except (InferenceServerException, OSError, Exception) as exc:
                    tally.add(_classify(exc), signalled=signalled.is_set(), detail=repr(exc))
                    break  # a fresh client (and connection) for the next request


def _grpc_loop(url: str, *, model: str, tally: Tally, stop: threading.Event, signalled: threading.Event) -> None:
    data = _image()
    client = grpcclient.InferenceServerClient(url)
    try:
        while not stop.is_set():
            inp = grpcclient.InferInput("image", list(data.shape), "FP32")
            inp.set_data_from_numpy(data)
            try:
                client.infer(model, [inp], client_timeout=60.0)
                tally.add("ok", signalled=signalled.is_set())
            except InferenceServerException as exc:
                # NOTE: gRPC core answers CANCELLED for calls that reached the server but no handler yet when it
                # shuts down (grpc/grpc#41785); counted apart: not our drain's loss, but the client sees it.
                outcome = CANCELLED_BY_CORE if "CANCELLED" in str(exc.status()) else _classify(exc)
                tally.add(outcome, signalled=signalled.is_set(), detail=f"{exc.status()} {exc.message()}")
                time.sleep(0.05)
    finally:
        client.close()


@dataclass
class _Stream:
    answered: threading.Event = field(default_factory=threading.Event)
    ended: list[str] = field(default_factory=list)  # why the stream ended, once it has

    def callback(self, result: object, error: InferenceServerException | None) -> None:
        # tritonclient: a response's error_message is an exception without a status; the stream ending with a
        # gRPC status is one with it.
        if error is not None and error.status() is not None:
            self.ended.append(f"{error.status()} {error.message()}")
        self.answered.set()


def _stream_loop(url: str, *, model: str, tally: Tally, stop: threading.Event, signalled: threading.Event) -> None:
    """One ModelStreamInfer stream, one request in flight: each request ends answered, or the stream ends."""
    data = _image()
    while not stop.is_set():
        stream, client = _Stream(), grpcclient.InferenceServerClient(url)
        try:
            client.start_stream(callback=stream.callback)
        except InferenceServerException as exc:
            tally.add("refused", signalled=signalled.is_set(), detail=f"stream: {exc}")
            time.sleep(0.05)
            continue
        try:
            while not stop.is_set() and not stream.ended:
                stream.answered.clear()
                inp = grpcclient.InferInput("image", list(data.shape), "FP32")
                inp.set_data_from_numpy(data)
                try:
                    client.async_stream_infer(model, [inp])
                except InferenceServerException as exc:  # the stream is closed: this one was never sent
                    tally.add("refused", signalled=signalled.is_set(), detail=f"stream: {exc}")
                    break
                if not stream.answered.wait(60) or stream.ended:  # taken by the server, never answered
                    why = stream.ended[0] if stream.ended else "no answer in 60 s"
                    never_connected = any(m in why.lower() for m in NOT_ACCEPTED)
                    tally.add("refused" if never_connected else "lost", signalled=signalled.is_set(),
                              detail=f"stream: {why}")
                else:
                    tally.add("ok", signalled=signalled.is_set())
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()


def stop_under_load(*, engine: str, name: str, http_url: str, grpc_url: str, pre_stop: list[str],
                    grace_s: int, model: str = "cnn", threads: int = 4, streams: int = 2) -> dict:
    """Send requests from `threads` http and `threads` grpc clients, stop the container, report the outcomes."""
    tally, stop, signalled = Tally(), threading.Event(), threading.Event()
    workers = [threading.Thread(target=loop, args=(url,), daemon=True,
                                kwargs={"model": model, "tally": tally, "stop": stop, "signalled": signalled})
               for loop, url in ((_http_loop, http_url), (_grpc_loop, grpc_url)) for _ in range(threads)]
    workers += [threading.Thread(target=_stream_loop, args=(grpc_url,), daemon=True,
                                 kwargs={"model": model, "tally": tally, "stop": stop, "signalled": signalled})
                for _ in range(streams)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    while tally.counts["ok"] < 50 and time.monotonic() < deadline:  # clients are up and being answered
        time.sleep(0.1)
    started = time.monotonic()
    pre_stop_rc = None
    if pre_stop:  # Kubernetes runs preStop first; requests keep coming (endpoints may lag)
        pre_stop_rc = subprocess.run([engine, "exec", name, *pre_stop], check=False, capture_output=True,
                                     timeout=grace_s).returncode
    left = max(1, int(grace_s - (time.monotonic() - started)))
    signalled.set()
    signal_at = tally.signal_at = time.monotonic()
    subprocess.run([engine, "stop", "-t", str(left), name], check=False, capture_output=True, timeout=grace_s + 30)
    stopped_s = time.monotonic() - signal_at
    exit_code = subprocess.run([engine, "inspect", name, "--format", "{{.State.ExitCode}}"],
                               capture_output=True, text=True, check=False).stdout.strip()
    time.sleep(1.0)  # let clients record the last refusals after the exit
    stop.set()
    for w in workers:
        w.join(timeout=70)
    return {"outcomes": dict(tally.counts), "after_sigterm": dict(tally.after_signal),
            "lost_examples": tally.lost_examples, "refusals": dict(tally.refusals.most_common(4)),
            "exit_code": exit_code, "sigterm_to_exit_s": round(stopped_s, 2),
            "kill_after_s": left, "grace_s": grace_s, "pre_stop": pre_stop, "pre_stop_exit_code": pre_stop_rc}
