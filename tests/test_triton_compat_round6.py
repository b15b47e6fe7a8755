"""Triton compatibility, round 6: what tritonclient users call that rounds 4 and 5 left unchecked, each mismatch
found against Triton's docs and sources and shown here through a real server and the real clients
(docs/RELIABILITY.md "Triton compatibility, round 6")."""

from __future__ import annotations

import asyncio
import queue
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server, wait_until
from tests.onnx_builders import scale_model, write_config

# A batch forms only when 8 rows are queued or after 10 minutes: a lone request stays queued for the whole test.
HOLDING = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 600000000 }\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton_round6") / "repo"
    scale_model(repo / "good" / "1" / "model.onnx")
    scale_model(repo / "holding" / "1" / "model.onnx")
    write_config(repo / "holding", HOLDING)
    return repo


@pytest.fixture(scope="module")
def server(repo):
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--model-control-mode", "explicit", "--load-model", "good",
            "--load-model", "holding"]
    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}) as url:
        yield SimpleNamespace(url=url, grpc_url=f"127.0.0.1:{grpc_port}",
                              http=httpclient.InferenceServerClient(url),
                              grpc=grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))


def _input(module, rows: int = 1):
    tensor = module.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 4), np.float32))
    return tensor


def _metric(url: str, name: str, model: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"http://{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if (sample.name in (name, f"{name}_total") and sample.labels.get("model") == model
                    and labels.items() <= sample.labels.items()):
                return sample.value
    raise AssertionError(f"{name} for {model!r} not exposed")


def _pending(server) -> float:
    return _metric(server.url, "nv_inference_pending_request_count", "holding")


# ---------------------------------------------------------------------------------------------- cancellation


def test_a_cancelled_grpc_request_stops_counting_as_pending(server):
    # Triton's request cancellation: a gRPC client's cancel releases its queued request. The pending gauge (what
    # the chart's autoscaling rules read) used to keep counting it until some later batch formed, here never.
    answers: queue.Queue = queue.Queue()
    call = server.grpc.async_infer("holding", [_input(grpcclient)],
                                   callback=lambda result, error: answers.put((result, error)))
    wait_until(lambda: _pending(server) == 1, timeout=30, what="the request queued")
    call.cancel()
    result, error = answers.get(timeout=30)
    assert result is None and isinstance(error, InferenceServerException)
    wait_until(lambda: _pending(server) == 0, timeout=30, what="the cancelled request leaving the queue")
    assert _metric(server.url, "nv_inference_request_failure", "holding", reason="CANCELED") >= 1
    # The queue still works: 8 rows form a batch at once.
    assert server.grpc.infer("holding", [_input(grpcclient, 8)]).as_numpy("y").tolist() == [[2.0] * 4] * 8


def test_a_stream_closed_with_its_requests_cancelled_leaves_nothing_pending(server):
    # tritonclient's stop_stream(cancel_requests=True) cancels the stream with requests still queued.
    answers: queue.Queue = queue.Queue()
    server.grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(3):
            server.grpc.async_stream_infer("holding", [_input(grpcclient)], request_id=str(i))
        wait_until(lambda: _pending(server) == 3, timeout=30, what="the stream's requests queued")
    finally:
        server.grpc.stop_stream(cancel_requests=True)
    wait_until(lambda: _pending(server) == 0, timeout=30, what="the cancelled stream's requests leaving the queue")


async def test_a_cancelled_grpc_aio_call_stops_counting_as_pending(server):
    async with grpcaio.InferenceServerClient(server.grpc_url) as client:
        call = asyncio.ensure_future(client.infer("holding", [_input(grpcaio)]))
        await asyncio.to_thread(wait_until, lambda: _pending(server) == 1, timeout=30, what="the request queued")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await asyncio.to_thread(wait_until, lambda: _pending(server) == 0, timeout=30, what="the request leaving")
