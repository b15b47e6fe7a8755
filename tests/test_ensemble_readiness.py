"""An ensemble whose composing model is unloaded cannot serve (Triton: UNAVAILABLE): readiness, the repository
index and inference say which composing model is missing, over HTTP (503) and the real gRPC client
(UNAVAILABLE); once the composing model is back the ensemble serves again without being reloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, two_io_model, write_config

# IN -> double -> D -> triple -> OUT (= 6 * IN)
PIPELINE = """name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    { model_name: "double" model_version: -1 input_map { key: "x" value: "IN" } output_map { key: "y" value: "D" } },
    { model_name: "triple" model_version: -1 input_map { key: "x" value: "D" } output_map { key: "y" value: "OUT" } }
  ]
}
"""
ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    scale_model(root / "double" / "1" / "model.onnx", factor=2.0)
    write_config(root / "double", "max_batch_size: 8\n")
    scale_model(root / "triple" / "1" / "model.onnx", factor=3.0)
    write_config(root / "triple", "max_batch_size: 8\n")
    write_config(root / "pipeline", PIPELINE)
    (root / "pipeline" / "1").mkdir()
    return root


def _body() -> dict:
    return {"inputs": [{"name": "IN", "shape": list(ROWS.shape), "datatype": "FP32", "data": ROWS.ravel().tolist()}]}


def _grpc_in() -> list:
    inp = grpcaio.InferInput("IN", list(ROWS.shape), "FP32")
    inp.set_data_from_numpy(ROWS)
    return [inp]


async def _index(http) -> dict[str, dict]:
    return {m["name"]: m for m in (await http.post("/v2/repository/index", json={})).json()}


async def test_unloading_a_composing_model_makes_the_ensemble_unavailable_until_it_returns(repo) -> None:
    port = free_port()
    async with inprocess_server(repo, grpc_port=port, model_control_mode="explicit", load_model=["pipeline"]) \
            as (_, http):
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        np.testing.assert_allclose((await client.infer("pipeline", _grpc_in())).as_numpy("OUT"), ROWS * 6)
        await client.unload_model("double")

        assert not await client.is_model_ready("pipeline")
        ready = await http.get("/v2/models/pipeline/ready")
        assert ready.status_code == 503 and "composing model 'double'" in ready.json()["error"], ready.text
        entry = (await _index(http))["pipeline"]
        assert entry["state"] == "UNAVAILABLE" and "'double'" in entry["reason"], entry
        assert await client.is_model_ready("triple")  # the other composing model is untouched

        r = await http.post("/v2/models/pipeline/infer", json=_body())
        assert r.status_code == 503, r.text
        assert "pipeline" in r.json()["error"] and "composing model 'double'" in r.json()["error"]
        with pytest.raises(InferenceServerException) as err:
            await client.infer("pipeline", _grpc_in())
        assert err.value.status() == "StatusCode.UNAVAILABLE" and "'double'" in err.value.message()

        await client.load_model("double")  # back: the ensemble serves again, no reload of its own
        assert await client.is_model_ready("pipeline")
        assert (await _index(http))["pipeline"]["state"] == "READY"
        np.testing.assert_allclose((await client.infer("pipeline", _grpc_in())).as_numpy("OUT"), ROWS * 6)
        await client.close()


async def test_composing_model_reloaded_with_other_inputs_makes_the_ensemble_say_so(repo) -> None:
    async with inprocess_server(repo, model_control_mode="explicit", load_model=["pipeline"]) as (_, http):
        assert (await http.post("/v2/models/pipeline/infer", json=_body())).status_code == 200
        two_io_model(repo / "double" / "1" / "model.onnx")  # inputs a, b: the step's input_map key x is gone
        assert (await http.post("/v2/repository/models/double/load", json={})).status_code == 200
        r = await http.post("/v2/models/pipeline/infer", json=_body())
        assert r.status_code == 503, r.text
        assert "composing model 'double'" in r.json()["error"] and "input_map" in r.json()["error"]
        assert (await http.get("/v2/models/pipeline/ready")).status_code == 503
        index = await _index(http)
        assert index["pipeline"]["state"] == "UNAVAILABLE" and index["double"]["state"] == "READY"
        ready_only = (await http.post("/v2/repository/index", json={"ready": True})).json()
        assert "pipeline" not in {m["name"] for m in ready_only}
