"""Audit, round 3 (docs/RELIABILITY.md): each failure found by attacking a real server over gRPC, as a
regression test against a real subprocess server with the real tritonclient (sync and aio) and a raw channel."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server
from tests.onnx_builders import scale_model, string_model

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def grpc_url(tmp_path_factory: pytest.TempPathFactory):
    repo: Path = tmp_path_factory.mktemp("audit_grpc") / "models"
    scale_model(repo / "double" / "1" / "model.onnx", factor=2.0)
    string_model(repo / "strings" / "1" / "model.onnx")
    port = free_port()
    args = ["--grpc-port", str(port), "--model-control-mode", "explicit", "--load-model", "*",
            "--allow-client-shm", "true"]
    with run_server(repo, extra_args=args):
        yield f"127.0.0.1:{port}"


def _request(request_id: str) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    return pb.ModelInferRequest(model_name="double", id=request_id, inputs=[tensor])


def test_an_unparsable_message_on_a_stream_is_answered_and_no_request_is_lost(grpc_url):
    # Before: the stream ended with status OK and no answer at all, dropping the valid requests around it.
    with grpc.insecure_channel(grpc_url) as channel:
        stream = channel.stream_stream(STREAM, request_serializer=lambda b: b,
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        messages = [_request("first").SerializeToString(), b"\xff\xff\xff garbage", _request("last").SerializeToString()]
        call = stream(iter(messages), timeout=60)
        answers = list(call)
        assert call.code() == grpc.StatusCode.OK
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"first", "last", ""} and len(answers) == 3
    assert "not a valid ModelInferRequest" in by_id[""].error_message
    for request_id in ("first", "last"):
        assert by_id[request_id].error_message == ""
        raw = by_id[request_id].infer_response.raw_output_contents[0]
        assert np.frombuffer(raw, np.float32).tolist() == [2, 4, 6, 8]


def test_tritonclient_stream_still_answers_every_request(grpc_url):
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(3):
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.full((1, 4), i, np.float32))
            client.async_stream_infer("double", [x], request_id=str(i))
        got = {}
        for _ in range(3):
            result, error = answers.get(timeout=60)
            assert error is None
            got[result.get_response().id] = result.as_numpy("y").tolist()
    finally:
        client.stop_stream()
    assert got == {str(i): [[2 * i] * 4] for i in range(3)}


def test_bytes_that_are_not_utf8_are_invalid_argument_not_internal(grpc_url):
    async def go() -> None:
        client = grpcaio.InferenceServerClient(grpc_url)
        try:
            x = grpcaio.InferInput("x", [1, 1], "BYTES")
            x.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
            with pytest.raises(InferenceServerException) as err:
                await client.infer("strings", [x])
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "BYTES element 0 is not valid UTF-8" in err.value.message()
            x.set_data_from_numpy(np.array([[b"ok"]], dtype=object))
            assert (await client.infer("strings", [x])).as_numpy("y").tolist() == [[b"ok"]]
        finally:
            await client.close()

    asyncio.run(go())


def test_load_with_a_negative_max_batch_size_is_invalid_argument_and_the_model_keeps_serving(grpc_url):
    client = grpcclient.InferenceServerClient(grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.load_model("double", config=json.dumps({"max_batch_size": -5}))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "max_batch_size -5 is negative" in err.value.message()
    assert client.get_model_config("double").config.max_batch_size == 32
    x = grpcclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert client.infer("double", [x]).as_numpy("y").tolist() == [[2, 2, 2, 2]]


def test_trace_rate_beyond_32_bits_is_invalid_argument(grpc_url):
    client = grpcclient.InferenceServerClient(grpc_url)
    with pytest.raises(InferenceServerException) as err:
        client.update_trace_settings(settings={"trace_rate": str(2**40)})
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "2147483647" in err.value.message()
    assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] != [str(2**40)]


def test_a_shared_memory_object_shrunk_by_its_client_is_invalid_argument_not_a_crash(grpc_url):
    # Before: the region was an mmap; reading it after the client's ftruncate was SIGBUS, killing the server.
    key = f"/audit-{uuid.uuid4().hex[:12]}"
    handle = shm.create_shared_memory_region(key[1:], key, 64)
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        shm.set_shared_memory_region(handle, [np.arange(4, dtype=np.float32).reshape(1, 4)])
        client.register_system_shared_memory("shrinks", key, 64)
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_shared_memory("shrinks", 16)
        y = grpcclient.InferRequestedOutput("y")
        y.set_shared_memory("shrinks", 16, offset=32)
        client.infer("double", [x], outputs=[y])
        assert shm.get_contents_as_numpy(handle, np.float32, [1, 4], offset=32).tolist() == [[0, 2, 4, 6]]
        os.truncate(f"/dev/shm/{key[1:]}", 8)
        with pytest.raises(InferenceServerException) as err:
            client.infer("double", [x], outputs=[y])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "is now 8 bytes" in err.value.message()
        assert client.is_server_live()
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("contents", ["typed", "raw"])
def test_an_empty_shape_whose_other_dimensions_overflow_is_invalid_argument(grpc_url, contents):
    # Found by tests/test_fuzz.py: NumPy refuses to reshape [] to [0, 2651, 1525715, 570094160] of FP32 (its
    # non-zero dimensions overflow int64 bytes), which was an INTERNAL error instead of the client's.
    shape = [0, 2651, 1525715, 570094160]
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)
    request = pb.ModelInferRequest(model_name="double", inputs=[tensor])
    if contents == "raw":
        request.raw_input_contents.append(b"")
    with grpc.insecure_channel(grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            infer(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "byte size overflow" in err.value.details()
