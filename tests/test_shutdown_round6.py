"""Shutdown, round 6: on SIGTERM every call gets its own answer or a clear refusal; none ends CANCELLED.

Before: grpc.aio's server.stop() at SIGTERM ended with CANCELLED the calls that had reached the server but not
yet a handler (grpc/grpc#41785), 4-7 per stop under steady traffic, and with `--http-workers` a health Watch
stream held every drain for the whole exit timeout, then ended UNAVAILABLE without its NOT_SERVING.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from loadtests.shutdown_check import build_models, one_round, report
from service.grpc_drain import SHUTTING_DOWN, DrainGate
from tests.conftest import REPO_ROOT

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
    assert problems == []
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
