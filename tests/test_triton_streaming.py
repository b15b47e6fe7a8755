"""gRPC ModelStreamInfer with the real tritonclient (grpc.aio stream_infer and the sync start_stream API):
many requests in flight on one stream, per-request error_message, decoupled models' final-response flag."""

from __future__ import annotations

import asyncio
import queue
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as syncclient
import tritonclient.grpc.aio as grpcclient

from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config

# Triton's fixed delay, pinned (adaptive is the default): the stream's requests reach the batcher one by one.
BATCHED = ("max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 5000000 }\n"
           'parameters { key: "adaptive_batching" value: { string_value: "false" } }\n')


@pytest.fixture(scope="module")
async def grpc_url(tmp_path_factory) -> str:
    root: Path = tmp_path_factory.mktemp("stream") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\n")
    scale_model(root / "batched" / "1" / "model.onnx")
    write_config(root / "batched", BATCHED)
    scale_model(root / "decoupled" / "1" / "model.onnx", factor=3.0)
    write_config(root / "decoupled", "max_batch_size: 8\nmodel_transaction_policy { decoupled: true }\n")
    port = free_port()
    async with inprocess_server(root, grpc_port=port, model_control_mode="explicit", load_model=["*"]):
        yield f"127.0.0.1:{port}"


def _inputs(module, x: np.ndarray, name: str = "x") -> list:
    inp = module.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


async def _collect(client: grpcclient.InferenceServerClient, requests: list[dict]) -> list:
    async def gen():
        for r in requests:
            yield r

    got = []
    async for result, error in client.stream_infer(gen()):
        got.append((result, error))
        if len(got) == len(requests):
            break
    return got


async def test_aio_stream_answers_every_request_by_id_and_a_bad_one_does_not_end_it(grpc_url):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    requests = [{"model_name": "scale", "inputs": _inputs(grpcclient, x + i), "request_id": f"r{i}"} for i in range(4)]
    requests.insert(1, {"model_name": "nope", "inputs": _inputs(grpcclient, x), "request_id": "unknown"})
    requests.insert(3, {"model_name": "scale", "inputs": _inputs(grpcclient, np.zeros((2, 5), np.float32)),
                        "request_id": "badshape"})
    async with grpcclient.InferenceServerClient(grpc_url) as client:
        got = await _collect(client, requests)
    errors = [str(e) for r, e in got if e is not None]
    results = {r.get_response().id: r.as_numpy("y") for r, e in got if e is None}
    assert sorted(results) == ["r0", "r1", "r2", "r3"]
    for i in range(4):
        np.testing.assert_allclose(results[f"r{i}"], (x + i) * 2)
    assert len(errors) == 2
    assert any("nope" in e for e in errors) and any("[2, 5]" in e or "expected" in e for e in errors)


async def test_requests_on_one_stream_are_in_flight_together_and_batch(grpc_url):
    # 8 requests, max_batch_size 8, a 5 s queue delay: answered at once only if all 8 are queued concurrently
    # (one after the other, each would wait out the delay alone and run as its own batch).
    x = np.ones((1, 4), dtype=np.float32)
    async with grpcclient.InferenceServerClient(grpc_url) as client:
        before = (await client.get_inference_statistics("batched")).model_stats[0]
        got = await _collect(client, [{"model_name": "batched", "inputs": _inputs(grpcclient, x * i),
                                       "request_id": str(i)} for i in range(8)])
        after = (await client.get_inference_statistics("batched")).model_stats[0]
    assert all(e is None for _, e in got)
    assert sorted(int(r.get_response().id) for r, _ in got) == list(range(8))
    assert after.inference_count - before.inference_count == 8
    assert after.execution_count - before.execution_count == 1


def _final_flag(result) -> bool | None:
    params = result.get_response().parameters
    return params["triton_final_response"].bool_param if "triton_final_response" in params else None


def _sync_stream(url: str, sends: list[dict], expect: int) -> list:
    """The sync client's start_stream / async_stream_infer / stop_stream, run in a worker thread."""
    answers: queue.Queue = queue.Queue()
    client = syncclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for send in sends:
        client.async_stream_infer(**send)
    got = [answers.get(timeout=60) for _ in range(expect)]
    client.stop_stream()
    client.close()
    return got


async def test_decoupled_model_sends_its_response_then_an_empty_final_one_when_asked(grpc_url):
    x = np.ones((1, 4), dtype=np.float32)
    sends = [{"model_name": "decoupled", "inputs": _inputs(syncclient, x), "request_id": "d",
              "enable_empty_final_response": True}]
    got = await asyncio.to_thread(_sync_stream, grpc_url, sends, 2)
    (first, e1), (final, e2) = got
    assert e1 is None and e2 is None
    np.testing.assert_allclose(first.as_numpy("y"), x * 3)
    assert _final_flag(first) is False
    assert _final_flag(final) is True and final.get_response().id == "d"
    assert len(final.get_response().outputs) == 0


async def test_non_decoupled_response_is_itself_final_and_no_flag_unless_asked(grpc_url):
    x = np.ones((1, 4), dtype=np.float32)
    sends = [{"model_name": "scale", "inputs": _inputs(syncclient, x), "request_id": "a",
              "enable_empty_final_response": True},
             {"model_name": "decoupled", "inputs": _inputs(syncclient, x), "request_id": "b"},
             {"model_name": "scale", "inputs": _inputs(syncclient, np.ones((1, 3), np.float32)), "request_id": "c"}]
    got = await asyncio.to_thread(_sync_stream, grpc_url, sends, 3)
    by_id = {r.get_response().id: r for r, e in got if e is None}
    errors = [str(e) for _, e in got if e is not None]
    assert set(by_id) == {"a", "b"} and len(errors) == 1 and "'x'" in errors[0]
    assert _final_flag(by_id["a"]) is True
    assert _final_flag(by_id["b"]) is None  # no empty final response asked for: one plain response
    np.testing.assert_allclose(by_id["b"].as_numpy("y"), x * 3)
