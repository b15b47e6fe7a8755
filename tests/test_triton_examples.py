"""What tritonclient's example clients (src/python/examples) do, re-implemented here, against a real server
serving Triton's example models (tests/triton_models.py) over HTTP and gRPC."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from tests.conftest import free_port, run_server
from tests.triton_models import build_triton_examples, model_bytes, save_model

# A tiny image classifier in image_client.py's shape: NCHW FP32 in, class scores out, labels beside it.
IMAGE_CONFIG = """
name: "tiny_image"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "data" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 4, 4 ] } ]
output [ { name: "prob" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
"""


def _image_model() -> bytes:
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["prob"])]
    return model_bytes(helper.make_graph(nodes, "tiny_image", [x], [y]))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_triton_examples(tmp_path_factory.mktemp("triton_examples") / "repo")
    save_model(repo / "tiny_image", _image_model(), IMAGE_CONFIG)
    (repo / "tiny_image" / "labels.txt").write_text("red\ngreen\nblue\n")
    grpc_port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(grpc_port), "--model-control-mode", "explicit",
                                      "--load-model", "*"]) as url:
        yield {"http": url, "grpc": f"127.0.0.1:{grpc_port}"}


def _simple_inputs(module, *, binary: bool | None = None):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"), module.InferInput("INPUT1", [1, 16], "INT32")]
    for x, data in zip(inputs, (a, b)):
        x.set_data_from_numpy(data) if binary is None else x.set_data_from_numpy(data, binary_data=binary)
    return inputs, a, b


def test_simple_http_infer_client(server):
    client = httpclient.InferenceServerClient(server["http"])
    for binary in (True, False):
        inputs, a, b = _simple_inputs(httpclient, binary=binary)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                   httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
        result = client.infer("simple", inputs, outputs=outputs, request_id="1")
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        assert result.get_response()["id"] == "1"


def test_simple_grpc_infer_client(server):
    client = grpcclient.InferenceServerClient(server["grpc"])
    inputs, a, b = _simple_inputs(grpcclient)
    outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
    result = client.infer("simple", inputs, outputs=outputs, client_timeout=30)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    meta = client.get_model_metadata("simple")
    assert [t.name for t in meta.inputs] == ["INPUT0", "INPUT1"] and list(meta.inputs[0].shape) == [-1, 16]
    config = client.get_model_config("simple").config
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [16]


def test_simple_http_string_infer_client(server):
    client = httpclient.InferenceServerClient(server["http"])
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([str(x).encode() for x in a.reshape(-1)], dtype=object).reshape(1, 16))
    inputs[1].set_data_from_numpy(np.array([str(x) for x in b.reshape(-1)], dtype=object).reshape(1, 16),
                                  binary_data=False)
    result = client.infer("simple_string", inputs)
    assert [int(x) for x in result.as_numpy("OUTPUT0").reshape(-1)] == (a + b).reshape(-1).tolist()
    assert [int(x) for x in result.as_numpy("OUTPUT1").reshape(-1)] == (a - b).reshape(-1).tolist()


def test_image_client_parses_the_config_and_classifies(server):
    client = httpclient.InferenceServerClient(server["http"])
    metadata, config = client.get_model_metadata("tiny_image"), client.get_model_config("tiny_image")
    # what image_client.py's parse_model reads, with the types it does arithmetic with
    max_batch_size = config["max_batch_size"]
    input_config, input_meta = config["input"][0], metadata["inputs"][0]
    assert max_batch_size == 4 and len(input_meta["shape"]) == 4
    assert input_config["format"] == mc.ModelInput.Format.Name(mc.ModelInput.FORMAT_NCHW)
    c, h, w = input_meta["shape"][1:]
    assert (c, h, w) == (3, 4, 4) and all(isinstance(d, int) for d in input_config["dims"])
    image = np.zeros((2, c, h, w), dtype=np.float32)
    image[0, 2], image[1, 0] = 1.0, 0.5  # row 0 is "blue", row 1 is "red"
    x = httpclient.InferInput(input_meta["name"], list(image.shape), input_meta["datatype"])
    x.set_data_from_numpy(image)
    result = client.infer("tiny_image", [x], outputs=[httpclient.InferRequestedOutput("prob", class_count=1)])
    top = [row[0].decode() for row in result.as_numpy("prob")]
    assert top == ["1.000000:2:blue", "0.500000:0:red"]


async def test_simple_async_infer_clients(server):
    http = httpaio.InferenceServerClient(server["http"])
    grpc_client = grpcaio.InferenceServerClient(server["grpc"])
    try:
        inputs, a, b = _simple_inputs(httpclient)
        results = await asyncio.gather(*(http.infer("simple", inputs, request_id=str(i)) for i in range(4)))
        grpc_inputs, _, _ = _simple_inputs(grpcclient)
        grpc_result = await grpc_client.infer("simple", grpc_inputs)
    finally:
        await http.close()
        await grpc_client.close()
    assert sorted(r.get_response()["id"] for r in results) == ["0", "1", "2", "3"]
    for r in [*results, grpc_result]:
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)


def test_simple_http_async_infer_client_threads(server):
    client = httpclient.InferenceServerClient(server["http"], concurrency=4)
    inputs, a, b = _simple_inputs(httpclient)
    pending = [client.async_infer("simple", inputs) for _ in range(4)]
    for request in pending:
        np.testing.assert_array_equal(request.get_result().as_numpy("OUTPUT1"), a - b)
    client.close()


def test_simple_grpc_model_control(server):
    client = grpcclient.InferenceServerClient(server["grpc"])
    assert client.is_model_ready("simple")
    client.unload_model("simple")
    assert not client.is_model_ready("simple")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["simple"].state == "UNAVAILABLE"
    client.load_model("simple")
    assert client.is_model_ready("simple")
    inputs, a, b = _simple_inputs(grpcclient)
    np.testing.assert_array_equal(client.infer("simple", inputs).as_numpy("OUTPUT0"), a + b)


def test_raw_binary_request_over_http(server):
    data = np.arange(6, dtype=np.float32).tobytes()
    resp = httpx.post(f"http://{server['http']}/v2/models/identity_fp32/infer", content=data,
                      headers={"Inference-Header-Content-Length": "0"}, timeout=30)
    header = int(resp.headers["Inference-Header-Content-Length"])
    assert resp.status_code == 200 and resp.content[header:] == data
