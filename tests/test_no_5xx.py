"""Regression tests: every client input that once got a 5xx (HTTP) or UNKNOWN (gRPC) now gets a 4xx /
INVALID_ARGUMENT whose message names the field. In-process server, gRPC on a loopback port in the test's loop."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from service.grpc_app import start_grpc_server
from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import gather_model, scale_model, string_model, write_config

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("no5xx") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    string_model(root / "strings" / "1" / "model.onnx")
    gather_model(root / "gather" / "1" / "model.onnx")
    write_config(root / "gather", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    return root


async def _status(client, model: str, body: object) -> tuple[int, str]:
    if isinstance(body, bytes):
        resp = await client.post(f"/v2/models/{model}/infer", content=body)
    else:
        resp = await client.post(f"/v2/models/{model}/infer", json=body)
    return resp.status_code, resp.json()["error"] if resp.status_code != 200 else ""


def _nested(depth: int, *, datatype: str, shape: str) -> bytes:
    """A request whose data is nested `depth` lists deep (written by hand: json.dumps would recurse too)."""
    data = b"[" * depth + b'"1"' + b"]" * depth
    return (b'{"inputs": [{"name": "x", "shape": ' + shape.encode() + b', "datatype": "' + datatype.encode()
            + b'", "data": ' + data + b"}]}")


HTTP_CASES = [
    ("scale", {"inputs": [{"name": "x", "shape": [0, 4611686018427387904, 4], "datatype": "FP32", "data": []}]},
     400, "exceed"),
    ("scale", {"inputs": [{"name": "x", "shape": [65536, 65536, 65536], "datatype": "FP32", "data": []}]},
     413, "max_request_bytes"),
    ("scale", {"inputs": [{"name": "x", "shape": [2**31 - 1, 2**31 - 1], "datatype": "FP32", "data": [1.0]}]},
     413, "max_request_bytes"),
    ("scale", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4],
                           "parameters": [1]}]}, 400, "parameters"),
    ("scale", {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
               "outputs": [{"name": "y", "parameters": "x"}]}, 400, "parameters"),
    ("strings", _nested(1000, datatype="BYTES", shape="[1, 1]"), 400, "nesting depth"),
    ("scale", _nested(1000, datatype="FP32", shape="[1, 4]"), 400, "nesting depth"),
    ("gather", {"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [12]}]},
     400, "out of the model's range"),
]


@pytest.mark.parametrize(("model", "body", "status", "words"), HTTP_CASES)
async def test_former_5xx_over_http_are_4xx(repo, model, body, status, words):
    async with inprocess_server(repo) as (_, client):
        got, message = await _status(client, model, body)
    assert got == status, message
    assert words in message
    assert "onnxruntime" not in message.lower() and str(repo) not in message


async def test_json_nested_past_the_parser_limit_is_400(repo):
    async with inprocess_server(repo) as (_, client):
        resp = await client.post("/v2/models/scale/infer", content=b"[" * 5000 + b"]" * 5000)
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]


async def test_an_out_of_range_index_fails_only_its_own_request_in_a_batch(repo):
    import asyncio

    async with inprocess_server(repo) as (_, client):
        good = {"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [3]}]}
        bad = {"inputs": [{"name": "idx", "shape": [1, 1], "datatype": "INT64", "data": [99]}]}
        results = await asyncio.gather(_status(client, "gather", good), _status(client, "gather", bad),
                                       _status(client, "gather", good))
    assert [r[0] for r in results] == [200, 400, 200]


def _tensor(shape: list[int], *, typed: bool = True) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="scale")
    t = req.inputs.add(name="x", datatype="FP32", shape=shape)
    if typed:
        t.contents.fp32_contents.extend([1.0, 2.0])
    return req


def _classification_abc() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="scale")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    req.outputs.add(name="y").parameters["classification"].string_param = "abc"
    return req


def _gather_oob() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="gather")
    req.inputs.add(name="idx", datatype="INT64", shape=[1, 1]).contents.int64_contents.append(12)
    return req


GRPC_CASES = [
    (_tensor([2**32, 2**32]).SerializeToString(), "exceed"),
    (_tensor([0, 2**62]).SerializeToString(), "exceed"),
    (_classification_abc().SerializeToString(), "classification"),
    (_gather_oob().SerializeToString(), "out of the model's range"),
    (b"\xff\xff\xff\xff garbage that is not a protobuf", "not a valid ModelInferRequest"),
    (b"\x0a\x05sc", "not a valid ModelInferRequest"),  # a string field cut short
]


async def test_former_unknown_over_grpc_are_invalid_argument(repo):
    async with inprocess_server(repo) as (server, _):
        port = free_port()
        grpc_server = await start_grpc_server(server.core, host="127.0.0.1", port=port,
                                              max_message_bytes=64 * 1024 * 1024)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(INFER)  # no serializers: raw bytes both ways
                for raw, words in GRPC_CASES:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(raw, timeout=30)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw[:40], info.value.details())
                    assert words in info.value.details()
                unsupported = channel.unary_unary("/inference.GRPCInferenceService/CudaSharedMemoryRegister")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unsupported(b"", timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # Triton's answer without GPUs
        finally:
            await grpc_server.stop(grace=None)
