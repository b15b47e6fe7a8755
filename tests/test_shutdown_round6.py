"""Shutdown, round 6: on SIGTERM every call gets its own answer or a clear refusal; none ends CANCELLED.

Before: grpc.aio's server.stop() at SIGTERM ended with CANCELLED the calls that had reached the server but not
yet a handler (grpc/grpc#41785), 4-7 per stop under steady traffic, and with `--http-workers` a health Watch
stream held every drain for the whole exit timeout, then ended UNAVAILABLE without its NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import grpc
import pytest

from loadtests.shutdown_check import build_models, one_round, report
from service.grpc_drain import SHUTTING_DOWN, DrainGate
from tests.conftest import REPO_ROOT, wait_until
from tests.onnx_builders import scale_model
from tests.test_lifecycle import serving

# --- from outside: a real server, every kind of caller, SIGTERM (loadtests/shutdown_check.py) ----------------


@pytest.mark.parametrize("http_workers", [1, 2])
async def test_sigterm_amid_callers_answers_or_refuses_every_call_clearly(tmp_path, http_workers):
    # tritonclient grpc.aio / grpc / http.aio, pipelined raw HTTP, ModelStreamInfer and health Watch streams
    # send without pause; SIGTERM comes after a few hundred answers. The exit timeout is long, so a drain that
    # waits on something it should not (a Watch stream) shows as a server still up, not as a lucky pass.
    repo = build_models(tmp_path / "repo")
    out, computed, info = await one_round(repo, tmp_path, code_root=REPO_ROOT, http_workers=http_workers,
                                          stop_after=150, callers=12, seed=0,
                                          extra_args=["--exit-timeout-secs", "600"], exit_wait_s=120)
    total, problems = report([(out, computed, info)])
    print(sorted(total.items()))
    assert problems == []  # with front ends too: no request cut (round 8, tests/test_shutdown_round8.py)
    assert info["exit"] == 0
    # It did exercise the drain: answers before the signal, refusals after it, and a Watch that saw it.
    assert total[("grpc.aio", "OK right")] > 0 and total[("http.aio", "OK right")] > 0
    assert sum(n for (_, kind), n in total.items() if "shutting down" in kind or kind == "refused at connect") > 0
    assert total[("health Watch", "ended OK after NOT_SERVING")] >= 1
    assert not any(kind == "CANCELLED" for _, kind in total)


# --- the gate itself, in-process: what a call gets in each phase of the drain --------------------------------


def _bytes(x: bytes) -> bytes:
    return x


class _Methods(grpc.GenericRpcHandler):
    """/t/Read answers at once; /t/Run waits for `go` (a call in progress when the drain begins)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = asyncio.Event()
        self.ran: list[bytes] = []

    def service(self, details):
        if details.method == "/t/Read":
            return grpc.unary_unary_rpc_method_handler(self._read, _bytes, _bytes)
        if details.method == "/t/Run":
            return grpc.unary_unary_rpc_method_handler(self._run, _bytes, _bytes)
        return None

    async def _read(self, request: bytes, context) -> bytes:
        return b"read " + request

    async def _run(self, request: bytes, context) -> bytes:
        self.ran.append(request)
        self.started.set()
        await self.go.wait()
        return b"ran " + request


async def test_drain_gate_finishes_what_runs_answers_reads_and_refuses_the_rest_with_unavailable():
    methods = _Methods()
    # A quiet period long enough that the late call below surely arrives within it.
    gate = DrainGate([methods], reads=frozenset({"/t/Read"}), quiet_s=2.0, max_quiet_wait_s=60.0)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((gate,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        read, run = channel.unary_unary("/t/Read"), channel.unary_unary("/t/Run")
        running = asyncio.ensure_future(run(b"first", timeout=60))
        await asyncio.wait_for(methods.started.wait(), 60)

        gate.begin_drain()  # SIGTERM
        assert await read(b"x", timeout=60) == b"read x"  # a read is still answered
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await run(b"second", timeout=60)  # anything else is refused at once, not run
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details() == SHUTTING_DOWN

        stopping = asyncio.ensure_future(gate.stop(server, deadline=loop.time() + 600))
        await asyncio.sleep(0)
        assert not stopping.done() and gate.running == 1  # it waits for the call in progress
        # Meanwhile a new call is neither run nor ended: it is held (closing begins once nothing runs)...
        methods.go.set()
        assert await running == b"ran first"
        await asyncio.wait_for(gate.closing.wait(), 60)  # once the first call has finished
        held = asyncio.ensure_future(read(b"late", timeout=60))
        # ...and refused with UNAVAILABLE once the server has begun to stop; the stop then completes.
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await held
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE and late.value.details() == SHUTTING_DOWN
        await asyncio.wait_for(stopping, 60)
    assert methods.ran == [b"first"]


async def test_drain_gate_stop_now_ends_the_waits():
    methods = _Methods()
    gate = DrainGate([methods])
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((gate,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        running = asyncio.ensure_future(channel.unary_unary("/t/Run")(b"stuck", timeout=60))
        await asyncio.wait_for(methods.started.wait(), 60)
        stopping = asyncio.ensure_future(gate.stop(server, deadline=asyncio.get_running_loop().time() + 600))
        await asyncio.sleep(0)
        gate.stop_now()  # a second signal: the server stops, the stuck call is cancelled
        await asyncio.wait_for(asyncio.gather(stopping, server.stop(None)), 60)
        with pytest.raises(grpc.aio.AioRpcError):
            await running


# --- HTTP: a pipelined batch that arrives during the drain is answered whole ---------------------------------


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _read_answer(f) -> tuple[int, dict[str, str], bytes]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip().lower()
    return status, headers, f.read(int(headers["content-length"]))


def test_pipelined_requests_arriving_while_draining_are_all_answered_then_the_connection_closes(tmp_path):
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    with serving(root, args=["--exit-timeout-secs", "600"]) as (proc, url):
        host, port = url.split(":")
        idle, half = socket.create_connection((host, int(port))), socket.create_connection((host, int(port)))
        for sock in (idle, half):  # one request each first: both connections are accepted and kept alive
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        # A request whose body is still coming holds the drain open (the exit timeout is long).
        half.sendall(b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{")
        proc.send_signal(signal.SIGTERM)
        # The drain closes the listening socket and marks the open connections in one step.
        wait_until(lambda: _refused(host, int(port)), what="the server to begin draining")
        bodies = [json.dumps({"id": f"r{i}", "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                          "data": [i, i, i, i]}]}).encode() for i in range(3)]
        idle.sendall(b"".join(b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(b), b) for b in bodies))
        idle.settimeout(60)
        with idle.makefile("rb") as f:
            answers = [_read_answer(f) for _ in range(3)]  # before: the 2nd and 3rd never came
            assert f.read() == b""  # then the connection closes
        for i, (status, headers, body) in enumerate(answers):
            assert status == 200, body
            assert json.loads(body)["outputs"][0]["data"] == [2.0 * i] * 4
            assert headers.get("connection") == ("close" if i == 2 else None)
        half.close()  # its client gone, the drain ends
        assert proc.wait(timeout=120) == 0
        idle.close()


# --- round 9: a stalled loop is not silence --------------------------------------------------------------------


class _StopRecorder:
    def __init__(self) -> None:
        self.stopped_at: float | None = None

    async def stop(self, grace):
        self.stopped_at = asyncio.get_running_loop().time()


async def test_drain_gate_does_not_take_a_stalled_loop_for_a_quiet_port():
    """The quiet wait ends by its timer; if the loop was blocked meanwhile (a loaded machine), calls grpc-core took
    in that time had not reached a handler, so the gate watches again instead of stopping at once."""
    gate = DrainGate([_Methods()], quiet_s=0.2, max_quiet_wait_s=60.0)
    server = _StopRecorder()
    loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(gate.stop(server, deadline=loop.time() + 600))
    await asyncio.wait_for(gate.closing.wait(), 10)
    await asyncio.sleep(0.05)
    time.sleep(0.6)  # noqa: ASYNC251 - the point: the loop stalls through the whole quiet wait, as a starved process does
    unblocked = loop.time()
    await asyncio.wait_for(stopping, 30)
    assert server.stopped_at is not None and server.stopped_at - unblocked >= 0.2
