"""Model configuration as Triton has it: the config JSON route, `reshape`, optional (overridable initializer)
inputs, -1 dims on non-batch axes and max_batch_size 0; checked over HTTP and with tritonclient's gRPC aio
client against the real in-process server."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import write_config
from tests.triton_models import build_triton_examples, flat_sum_onnx, optional_bias_onnx

RESHAPED = """
name: "reshaped"
max_batch_size: 4
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2, 2 ] reshape: { shape: [ 4 ] } } ]
"""
OPTIONAL = """
name: "optional_bias"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "BIAS" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
BAD_RESHAPE = RESHAPED.replace('"reshaped"', '"bad_reshape"').replace("shape: [ 4 ] } } ]\noutput", "shape: [ 5 ] } } ]\noutput")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = build_triton_examples(tmp_path_factory.mktemp("triton_config"))
    for name, data, config in (("reshaped", flat_sum_onnx(), RESHAPED), ("optional_bias", optional_bias_onnx(), OPTIONAL),
                               ("bad_reshape", flat_sum_onnx(), BAD_RESHAPE)):
        write_config(root / name, config)
        (root / name / "1").mkdir()
        (root / name / "1" / "model.onnx").write_bytes(data)
    return root


def _input(name: str, data: np.ndarray, datatype: str) -> InferInput:
    x = InferInput(name, list(data.shape), datatype)
    x.set_data_from_numpy(data)
    return x


async def test_config_json_has_every_field_and_int64_numbers(repo):
    async with inprocess_server(repo) as (_, client):
        simple = (await client.get("/v2/models/simple/config")).json()
        unbatched = (await client.get("/v2/models/optional_bias/config")).json()
    assert simple["max_batch_size"] == 8 and simple["input"][0]["dims"] == [16]
    assert simple["input"][0]["data_type"] == "TYPE_INT32" and simple["output"][1]["name"] == "OUTPUT1"
    # what image_client.py reads: max_batch_size even when 0, dims as numbers, zero-valued fields present
    assert unbatched["max_batch_size"] == 0 and unbatched["input"][1]["optional"] is True
    assert unbatched["input"][0]["optional"] is False and unbatched["input"][0]["format"] == "FORMAT_NONE"
    assert unbatched["instance_group"][0]["count"] == 1 and unbatched["batch_input"] == []


async def test_reshape_serves_dims_and_feeds_the_graph_its_shape(repo):
    port = free_port()
    x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    async with inprocess_server(repo, grpc_port=port) as (_, client):
        meta = (await client.get("/v2/models/reshaped")).json()
        resp = await client.post("/v2/models/reshaped/infer", json={"inputs": [
            {"name": "INPUT0", "shape": [2, 2, 2], "datatype": "FP32", "data": x.tolist()}]})
        grpc_client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            result = await grpc_client.infer("reshaped", [_input("INPUT0", x, "FP32")])
        finally:
            await grpc_client.close()
    assert meta["inputs"][0]["shape"] == [-1, 2, 2] and meta["outputs"][0]["shape"] == [-1, 2, 2]
    out = resp.json()["outputs"][0]
    assert resp.status_code == 200 and out["shape"] == [2, 2, 2] and out["data"] == (x + 1).reshape(-1).tolist()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + 1)


async def test_reshape_with_another_element_count_does_not_load(repo):
    async with inprocess_server(repo) as (_, client):
        index = (await client.post("/v2/repository/index", json={})).json()
    row = next(r for r in index if r["name"] == "bad_reshape")
    assert row["state"] == "UNAVAILABLE" and "reshape [5] holds 5 elements, dims [2, 2] hold 4" in row["reason"]


async def test_optional_input_may_be_omitted_or_fed(repo):
    port = free_port()
    x = np.arange(4, dtype=np.float32)
    async with inprocess_server(repo, grpc_port=port) as (_, client):
        grpc_client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            omitted = await grpc_client.infer("optional_bias", [_input("INPUT0", x, "FP32")])
            fed = await grpc_client.infer("optional_bias", [_input("INPUT0", x, "FP32"),
                                                            _input("BIAS", np.full(4, 10, np.float32), "FP32")])
            with pytest.raises(InferenceServerException) as err:
                await grpc_client.infer("optional_bias", [_input("BIAS", x, "FP32")])
        finally:
            await grpc_client.close()
        http_omitted = await client.post("/v2/models/optional_bias/infer", json={"inputs": [
            {"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": x.tolist()}]})
    np.testing.assert_array_equal(omitted.as_numpy("OUTPUT0"), x + 1)
    np.testing.assert_array_equal(fed.as_numpy("OUTPUT0"), x + 10)
    assert http_omitted.json()["outputs"][0]["data"] == (x + 1).tolist()
    assert "StatusCode.INVALID_ARGUMENT" in err.value.status() and (
        "expected number of inputs between 1 and 2 but got 1 inputs for model 'optional_bias'. Got input(s) "
        "['BIAS'], but missing required input(s) ['INPUT0']. Please provide all required input(s)."
        in err.value.message())


async def test_variable_non_batch_dims_take_any_length(repo):
    async with inprocess_server(repo) as (_, client):
        meta = (await client.get("/v2/models/simple_identity")).json()
        for length in (1, 3, 7):
            resp = await client.post("/v2/models/simple_identity/infer", json={"inputs": [
                {"name": "INPUT0", "shape": [1, length], "datatype": "BYTES", "data": [str(i) for i in range(length)]}]})
            assert resp.json()["outputs"][0]["shape"] == [1, length]
            assert resp.json()["outputs"][0]["data"] == [str(i) for i in range(length)]
    assert meta["inputs"][0]["shape"] == [-1, -1]
