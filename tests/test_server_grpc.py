"""The gRPC servicer in-process: the real Server's grpc.aio server on a loopback port in the test's own event
loop, driven by the real tritonclient.grpc.aio (raw contents) and a plain grpc.aio stub (typed contents)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, string_model, two_io_model, write_config


@pytest.fixture(scope="module")
async def grpc_url(tmp_path_factory) -> str:
    root: Path = tmp_path_factory.mktemp("grpc") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    # Triton's fixed delay, pinned: grpc.aio hands the 8 RPCs of the batching test to the server one after another,
    # which adaptive batching (the default) does not hold for.
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 100000 }\n"
                 'parameters { key: "adaptive_batching" value: { string_value: "false" } }\n')
    scale_model(root / "half" / "1" / "model.onnx", dtype=10)
    string_model(root / "strings" / "1" / "model.onnx")
    two_io_model(root / "two_io" / "1" / "model.onnx")
    port = free_port()
    async with inprocess_server(root, grpc_port=port, model_control_mode="explicit", load_model=["*"]):
        yield f"127.0.0.1:{port}"


@pytest.fixture
async def client(grpc_url):
    c = grpcclient.InferenceServerClient(grpc_url)
    yield c
    await c.close()


def _input(name: str, data: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


async def test_health_metadata_config_and_index(client):
    assert await client.is_server_live() and await client.is_server_ready() and await client.is_model_ready("scale")
    assert (await client.get_server_metadata()).name == "modelserve"
    meta = await client.get_model_metadata("scale")
    assert meta.inputs[0].name == "x" and list(meta.inputs[0].shape) == [-1, 4]
    config = (await client.get_model_config("scale")).config
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 100000
    index = await client.get_model_repository_index()
    assert {m.name: m.state for m in index.models}["scale"] == "READY"


async def test_infer_raw_contents_fp32_fp16_bytes_and_output_selection(client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal((await client.infer("scale", [_input("x", x, "FP32")])).as_numpy("y"), x * 2)
    h = np.array([[0.5, -1.0, 2.0, 4.0]], np.float16)
    np.testing.assert_array_equal((await client.infer("half", [_input("x", h, "FP16")])).as_numpy("y"), h * 2)
    s = np.array([[b"a"], [b"bc"]], dtype=object)
    strings = (await client.infer("strings", [_input("x", s, "BYTES")])).as_numpy("y").reshape(-1)
    assert list(strings) == [b"a", b"bc"]
    a = np.array([[1, 9, 2]], np.float32)
    result = await client.infer("two_io", [_input("a", a, "FP32"), _input("b", a, "FP32")],
                                outputs=[grpcclient.InferRequestedOutput("idx")])
    assert result.as_numpy("idx").tolist() == [[1]] and result.as_numpy("sum") is None


async def test_typed_contents_are_accepted(grpc_url):
    """Clients other than tritonclient may send typed contents instead of raw bytes."""
    async with grpc.aio.insecure_channel(grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="scale")
        tensor = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        tensor.contents.fp32_contents.extend([1, 2, 3, 4])
        resp = await stub.ModelInfer(req)
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [2, 4, 6, 8]


async def test_errors_map_to_grpc_status_codes(client):
    with pytest.raises(InferenceServerException) as err:
        await client.infer("scale", [_input("x", np.zeros((1, 3), np.float32), "FP32")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected shape [-1, 4], got [1, 3]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        await client.infer("nope", [_input("x", np.zeros((1, 4), np.float32), "FP32")])
    assert err.value.status() == "StatusCode.NOT_FOUND"


async def test_batching_stats_and_load_unload(client):
    before = (await client.get_inference_statistics("scale")).model_stats[0]
    results = await asyncio.gather(*(client.infer("scale", [_input("x", np.full((1, 4), i, np.float32), "FP32")])
                                     for i in range(8)))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 4), 2 * i, np.float32))
    after = (await client.get_inference_statistics("scale")).model_stats[0]
    assert after.inference_count - before.inference_count == 8
    assert after.execution_count - before.execution_count < 8
    await client.unload_model("half")
    assert not await client.is_model_ready("half")
    await client.load_model("half")
    assert await client.is_model_ready("half")
