"""Input validation with Triton's wording where its QA tests look for it (qa/L0_input_validation, qa/L0_http):
checked before inference, over HTTP (JSON, binary, raw binary) and gRPC (tritonclient's aio client)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.triton_models import build_triton_examples


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_triton_examples(tmp_path_factory.mktemp("triton_validation"))


def _input(name: str, data: np.ndarray, datatype: str) -> InferInput:
    x = InferInput(name, list(data.shape), datatype)
    x.set_data_from_numpy(data)
    return x


def _nested(depth: int, value: object) -> object:
    for _ in range(depth):
        value = [value]
    return value


async def test_json_nesting_past_100_levels_is_rejected(repo):
    async with inprocess_server(repo) as (_, client):
        for depth, ok in ((50, True), (120, False)):
            body = {"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "BYTES", "data": _nested(depth, "hi")}]}
            resp = await client.post("/v2/models/simple_identity/infer", content=json.dumps(body))
            ints = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32",
                                "data": _nested(depth - 1, list(range(16)))},
                               {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))}]}
            resp_int = await client.post("/v2/models/simple/infer", content=json.dumps(ints))
            for r in (resp, resp_int):
                if ok:
                    assert r.status_code == 200, r.text
                else:
                    assert r.status_code == 400
                    assert "JSON nesting depth exceeds maximum allowed limit (100)" in r.json()["error"]


async def test_duplicate_output_names_are_400_over_http_and_grpc(repo):
    port = free_port()
    x = np.ones((1, 16), np.int32)
    body = {"inputs": [{"name": n, "shape": [1, 16], "datatype": "INT32", "data": x.tolist()} for n in ("INPUT0", "INPUT1")],
            "outputs": [{"name": "OUTPUT0"}, {"name": "OUTPUT0"}]}
    async with inprocess_server(repo, grpc_port=port) as (_, client):
        resp = await client.post("/v2/models/simple/infer", json=body)
        grpc_client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            with pytest.raises(InferenceServerException) as err:
                await grpc_client.infer("simple", [_input("INPUT0", x, "INT32"), _input("INPUT1", x, "INT32")],
                                        outputs=[InferRequestedOutput("OUTPUT1"), InferRequestedOutput("OUTPUT1")])
        finally:
            await grpc_client.close()
        live = await client.get("/v2/health/live")
    assert resp.status_code == 400
    assert "Duplicate output name 'OUTPUT0' is not allowed in a request" in resp.json()["error"]
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Duplicate output name 'OUTPUT1' is not allowed in a request" in err.value.message()
    assert live.status_code == 200


async def test_missing_inputs_and_byte_size_use_tritons_wording_over_grpc(repo):
    port = free_port()
    async with inprocess_server(repo, grpc_port=port):
        grpc_client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            with pytest.raises(InferenceServerException) as none_given:
                await grpc_client.infer("simple", [])
            with pytest.raises(InferenceServerException) as one_given:
                await grpc_client.infer("simple", [_input("INPUT0", np.ones((1, 16), np.int32), "INT32")])
            wrong = _input("INPUT0", np.ones((1, 18), np.int32), "INT32")
            wrong.set_shape([1, 16])  # 72 bytes declared as a [1, 16] INT32 tensor (64 bytes)
            with pytest.raises(InferenceServerException) as size:
                await grpc_client.infer("simple", [wrong, _input("INPUT1", np.ones((1, 16), np.int32), "INT32")])
        finally:
            await grpc_client.close()
    assert ("expected 2 inputs but got 0 inputs for model 'simple'. Got input(s) [], but missing required input(s) "
            "['INPUT0','INPUT1']. Please provide all required input(s).") in none_given.value.message()
    assert ("expected 2 inputs but got 1 inputs for model 'simple'. Got input(s) ['INPUT0'], but missing required "
            "input(s) ['INPUT1']. Please provide all required input(s).") in one_given.value.message()
    assert "input byte size mismatch for input 'INPUT0' for model 'simple'. Expected 64, got 72" in size.value.message()
    assert size.value.status() == "StatusCode.INVALID_ARGUMENT"


async def test_unknown_model_and_version_messages(repo):
    port = free_port()
    async with inprocess_server(repo, grpc_port=port) as (_, client):
        http = await client.get("/v2/models/nope")
        version = await client.get("/v2/models/simple/versions/7")
        grpc_client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            with pytest.raises(InferenceServerException) as err:
                await grpc_client.get_model_metadata("nope")
        finally:
            await grpc_client.close()
    assert http.status_code == 404 and http.json()["error"].startswith("Request for unknown model: 'nope' is not found")
    assert "available models are" in http.json()["error"]
    assert version.status_code == 404
    assert "Request for unknown model: 'simple' version 7 is not found" in version.json()["error"]
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'nope' is not found" in err.value.message()


async def test_negative_and_overflowing_shapes_are_400(repo):
    async def post(shape: list[int]):
        return await client.post("/v2/models/identity_fp32/infer", json={"inputs": [
            {"name": "INPUT0", "shape": shape, "datatype": "FP32", "data": [1.0]}]})

    async with inprocess_server(repo) as (_, client):
        negative = await post([2, -5])
        count = await post([2**4, 2**60 + 2])
        size = await post([2**2, 2**60 + 2])
    assert negative.status_code == 400 and "negative dimension" in negative.json()["error"]
    assert count.status_code == 400 and "causes total element count to exceed maximum size of" in count.json()["error"]
    assert size.status_code == 400 and "byte size overflow for input 'INPUT0'" in size.json()["error"]


async def test_raw_binary_requests(repo):
    async with inprocess_server(repo) as (_, client):
        async def raw(model: str, body: bytes):
            return await client.post(f"/v2/models/{model}/infer", content=body,
                                     headers={"Inference-Header-Content-Length": "0"})

        data = np.arange(8, dtype=np.float32).tobytes()
        ok, longer = await raw("identity_fp32", data), await raw("identity_fp32", data * 4)
        text = await raw("identity_bytes_1", b"427")
        two_vars = await raw("identity_fp16_2d", np.ones(4, np.float16).tobytes())
        two_inputs = await raw("simple", np.ones(32, np.int32).tobytes())
        ragged = await raw("identity_fp32", b"\0" * 7)
        many_bytes = await raw("simple_identity", b"427")
    for resp, expected in ((ok, data), (longer, data * 4)):
        header = int(resp.headers["Inference-Header-Content-Length"])
        assert resp.status_code == 200 and resp.content[header:] == expected
        assert json.loads(resp.content[:header])["outputs"][0]["shape"] == [1, len(expected) // 4]
    header = int(text.headers["Inference-Header-Content-Length"])
    assert text.content[header + 4:] == b"427"
    assert two_vars.status_code == 400 and ("The shape of the raw input 'INPUT0' can not be deduced because there "
                                            "are more than one variable-sized dimension") in two_vars.json()["error"]
    assert two_inputs.status_code == 400
    assert "Raw request must only have 1 input (found 1) to be deduced but got 2 inputs in" in two_inputs.json()["error"]
    assert ragged.status_code == 400 and "not a whole number of FP32 elements" in ragged.json()["error"]
    assert many_bytes.status_code == 400
    assert "For BYTE datatype raw input 'INPUT0', the model must have input shape [1]" in many_bytes.json()["error"]


async def test_string_count_mismatch_uses_tritons_wording(repo):
    port = free_port()
    async with inprocess_server(repo, grpc_port=port) as (_, client):
        resp = await client.post("/v2/models/simple_identity/infer", json={"inputs": [
            {"name": "INPUT0", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "b"]}]})
        grpc_client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            short = _input("INPUT0", np.array([[b"a", b"b"]], dtype=object), "BYTES")
            short.set_shape([1, 3])
            with pytest.raises(InferenceServerException) as err:
                await grpc_client.infer("simple_identity", [short])
        finally:
            await grpc_client.close()
    assert resp.status_code == 400 and "expected 3 strings for inference input 'INPUT0', got 2" in resp.json()["error"]
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected 3 strings for inference input 'INPUT0', got 2" in err.value.message()
