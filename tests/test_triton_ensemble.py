"""Ensembles (`platform: "ensemble"`, ensemble_scheduling steps) through the real tritonclient: steps chained
over ONNX models, each step batched by its model's own batcher and counted in its statistics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, two_io_model, write_config
from tests.triton_sequence_models import accumulator

# IN -> double -> D, IN -> triple -> T (independent steps), then two_io(a=D, b=T) -> OUT = 5 * IN, IDX = argmax.
PIPELINE = """name: "{name}"
platform: "ensemble"
max_batch_size: 8
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] }}, {{ name: "IDX" data_type: TYPE_INT64 dims: [ 1 ] }} ]
ensemble_scheduling {{
  step [
    {{ model_name: "two_io" model_version: -1 input_map {{ key: "a" value: "D" }} input_map {{ key: "b" value: "T" }}
      output_map {{ key: "sum" value: "OUT" }} output_map {{ key: "idx" value: "IDX" }} }},
    {{ model_name: "double" model_version: -1 input_map {{ key: "x" value: "IN" }} output_map {{ key: "y" value: "D" }} }},
    {{ model_name: "{triple}" model_version: 1 input_map {{ key: "x" value: "IN" }} output_map {{ key: "y" value: "T" }} }}
  ]
}}
"""


def _repo(root: Path) -> Path:
    scale_model(root / "double" / "1" / "model.onnx", factor=2.0)
    # A full batch of 4 leaves at once; the long delay only matters if fewer than 4 requests come.
    write_config(root / "double", "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [4] "
                                  "max_queue_delay_microseconds: 30000000 }\n")
    scale_model(root / "triple" / "1" / "model.onnx", factor=3.0)
    two_io_model(root / "two_io" / "1" / "model.onnx")
    write_config(root / "pipeline", PIPELINE.format(name="pipeline", triple="triple"))
    (root / "pipeline" / "1").mkdir()  # Triton's layout: an empty version folder
    write_config(root / "pipeline_bare", PIPELINE.format(name="pipeline_bare", triple="triple"))  # config only
    write_config(root / "broken", PIPELINE.format(name="broken", triple="no_such_model"))
    return root


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    repo = _repo(tmp_path_factory.mktemp("ens") / "models")
    grpc_port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(grpc_port)]) as url:
        yield url, f"127.0.0.1:{grpc_port}"


def _in(module, data: np.ndarray):
    inp = module.InferInput("IN", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return [inp]


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_ensemble_chains_steps_and_reports_metadata(urls, module):
    client = module.InferenceServerClient(urls[0] if module is httpclient else urls[1])
    # Four rows: `double` sends a batch as soon as it holds its preferred size (4).
    x = np.array([[1, 4, 2, 3], [0, -1, 5, 1], [9, 0, 0, 0], [0, 0, 0, 7]], np.float32)
    for model in ("pipeline", "pipeline_bare"):
        assert client.is_model_ready(model)
        result = client.infer(model, _in(module, x))
        np.testing.assert_allclose(result.as_numpy("OUT"), x * 5)
        assert result.as_numpy("IDX").tolist() == [[1], [2], [0], [3]]
    meta = client.get_model_metadata("pipeline")
    platform = meta["platform"] if module is httpclient else meta.platform
    assert platform == "ensemble"
    config = client.get_model_config("pipeline")
    steps = config["ensemble_scheduling"]["step"] if module is httpclient else config.config.ensemble_scheduling.step
    assert len(steps) == 3
    with pytest.raises(InferenceServerException) as err:
        client.infer("pipeline", _in(module, np.ones((1, 3), np.float32)))
    assert "expected shape [-1, 4]" in err.value.message()
    assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    client.close()


def test_broken_ensemble_is_unavailable_with_the_reason(urls):
    client = httpclient.InferenceServerClient(urls[0])
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "no_such_model" in index["broken"]["reason"]
    assert not client.is_model_ready("broken")
    client.close()


async def test_steps_are_batched_and_counted_per_composing_model_http_aio(urls):
    """Four concurrent ensemble requests form one batch of 4 on `double` (its preferred size)."""
    client = httpaio.InferenceServerClient(urls[0])

    async def count(model: str) -> int:
        stats = await client.get_inference_statistics(model)
        return int(stats["model_stats"][0]["inference_count"])

    before = {m: await count(m) for m in ("pipeline", "double", "triple", "two_io")}
    rows = [np.full((1, 4), i, np.float32) for i in range(4)]
    results = await asyncio.gather(*(client.infer("pipeline", _in(httpaio, r)) for r in rows))
    for r, res in zip(rows, results):
        np.testing.assert_allclose(res.as_numpy("OUT"), r * 5)
    for model in before:
        assert await count(model) == before[model] + 4
    double = (await client.get_inference_statistics("double"))["model_stats"][0]
    assert 4 in {int(b["batch_size"]) for b in double["batch_stats"]}
    await client.close()


async def test_explicit_load_of_an_ensemble_loads_its_models_first_grpc_aio(tmp_path):
    repo = _repo(tmp_path / "models")
    port = free_port()
    async with inprocess_server(repo, grpc_port=port, model_control_mode="explicit"):
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        assert not await client.is_model_ready("double")
        await client.load_model("pipeline")
        for model in ("pipeline", "double", "triple", "two_io"):
            assert await client.is_model_ready(model)
        result = await client.infer("pipeline", _in(grpcaio, np.ones((4, 4), np.float32)))
        np.testing.assert_allclose(result.as_numpy("OUT"), np.full((4, 4), 5.0))
        await client.close()


async def test_sequence_flags_reach_a_stateful_step_grpc_aio(tmp_path):
    """sequence_id / start / end on an ensemble request reach its stateful step, as in Triton."""
    repo = tmp_path / "models"
    accumulator(repo, name="acc")
    write_config(repo / "acc_ensemble", """name: "acc_ensemble"
platform: "ensemble"
max_batch_size: 8
input [ { name: "V" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "TOTAL" data_type: TYPE_INT32 dims: [ 1 ] } ]
ensemble_scheduling { step [ { model_name: "acc" model_version: -1
  input_map { key: "INPUT" value: "V" } output_map { key: "OUTPUT" value: "TOTAL" } } ] }
""")
    port = free_port()
    async with inprocess_server(repo, grpc_port=port):
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        totals = []
        for i, v in enumerate([4, 5, 6]):
            inp = grpcaio.InferInput("V", [1, 1], "INT32")
            inp.set_data_from_numpy(np.full((1, 1), v, np.int32))
            r = await client.infer("acc_ensemble", [inp], sequence_id=77, sequence_start=i == 0, sequence_end=i == 2)
            totals.append(int(r.as_numpy("TOTAL")[0][0]))
        assert totals == [4, 9, 15]
        with pytest.raises(InferenceServerException) as err:
            await client.infer("acc_ensemble", [inp])
        assert "in ensemble 'acc_ensemble'" in err.value.message()
        assert "must specify a non-zero or non-empty correlation ID" in err.value.message()
        await client.close()
