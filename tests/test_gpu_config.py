"""GPU settings from config.pbtxt (Triton's spelling) -> the exact (providers, provider_options) handed to
ONNX Runtime, checked on CPU through the pure functions; load errors through the real server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from service.errors import ModelLoadError
from service.model import instance_setups
from service.modelrepo.accelerators import GpuOptions, InstancePlan, gpu_options, instance_plans, provider_plan
from service.modelrepo.config import parse_config_text
from service.modelrepo.sessions import choose_providers
from service.modelrepo.variants import fp16_variant_file, instance_model_file
from service.settings import ServerSettings
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BUILD = ["AzureExecutionProvider", "CPUExecutionProvider"]

TRT_CONFIG = """
name: "m"
optimization { execution_accelerators { gpu_execution_accelerator [ {
  name: "tensorrt"
  parameters { key: "precision_mode" value: "FP16" }
  parameters { key: "max_workspace_size_bytes" value: "1073741824" }
  parameters { key: "trt_engine_cache_enable" value: "1" }
  parameters { key: "trt_engine_cache_path" value: "/tmp/trt-cache" }
} ] } }
parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }
parameters { key: "gpu_mem_limit" value: { string_value: "4294967296" } }
parameters { key: "arena_extend_strategy" value: { string_value: "1" } }
instance_group [ { kind: KIND_GPU count: 1 gpus: [ 1 ] } ]
"""


def _config(text: str):
    return parse_config_text(text)


def test_tensorrt_and_legacy_cuda_keys_map_to_ort_options() -> None:
    config = _config(TRT_CONFIG)
    [plan] = instance_plans(config)
    providers, options = provider_plan(plan, gpu_options(config), available=ALL)
    assert providers == ALL
    assert options == [
        {"device_id": "1", "trt_fp16_enable": "True", "trt_max_workspace_size": "1073741824",
         "trt_engine_cache_enable": "True", "trt_engine_cache_path": "/tmp/trt-cache"},
        {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": "4294967296",
         "arena_extend_strategy": "kSameAsRequested"},
        {},
    ]


def test_cuda_accelerator_only_leaves_tensorrt_out() -> None:
    config = _config("""
        optimization { execution_accelerators { gpu_execution_accelerator [ { name: "cuda"
          parameters { key: "cudnn_conv_use_max_workspace" value: "0" }
          parameters { key: "cudnn_conv_algo_search" value: "DEFAULT" }
          parameters { key: "use_ep_level_unified_stream" value: "true" } } ] } }""")
    [plan] = instance_plans(config)
    assert plan == InstancePlan(kind="KIND_AUTO", device_id=0)
    providers, options = provider_plan(plan, gpu_options(config), available=ALL)
    assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options == [{"device_id": "0", "cudnn_conv_use_max_workspace": "False", "cudnn_conv_algo_search": "DEFAULT",
                        "use_ep_level_unified_stream": "True"}, {}]


def test_gpus_list_places_count_instances_on_each_device() -> None:
    config = _config("instance_group [ { kind: KIND_GPU count: 2 gpus: [ 0, 1 ] }, { kind: KIND_CPU count: 1 } ]")
    plans = instance_plans(config)
    assert [(p.kind, p.device_id) for p in plans] == [("KIND_GPU", 0), ("KIND_GPU", 0), ("KIND_GPU", 1),
                                                      ("KIND_GPU", 1), ("KIND_CPU", 0)]
    planned = [provider_plan(p, GpuOptions(), available=ALL) for p in plans]
    assert [opts[0].get("device_id") for _, opts in planned] == ["0", "0", "1", "1", None]
    assert planned[-1] == (["CPUExecutionProvider"], [{}])


def test_requested_providers_bring_tensorrt_back_and_cpu_build_ignores_gpu_options() -> None:
    options = gpu_options(_config(TRT_CONFIG))
    auto = InstancePlan(kind="KIND_AUTO")
    assert provider_plan(auto, GpuOptions(), available=ALL, requested=ALL)[0] == ALL
    # KIND_AUTO on a CPU-only build: the GPU options are not used and not an error (as in Triton).
    assert provider_plan(auto, options, available=CPU_BUILD) == (["CPUExecutionProvider"], [{}])


@pytest.mark.parametrize(("text", "expected"), [
    ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
     'parameters { key: "precision" value: "FP16" } } ] } }', "unknown parameter 'precision'; expected one of"),
    ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
     'parameters { key: "precision_mode" value: "FP8" } } ] } }', "'precision_mode' must be FP32, FP16 or INT8"),
    ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
     'parameters { key: "trt_engine_cache_enable" value: "yes" } } ] } }', "must be 1/0 or true/false, got 'yes'"),
    ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" '
     'parameters { key: "max_workspace_size_bytes" value: "1GB" } } ] } }', "must be a non-negative integer"),
    ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "cuda" '
     'parameters { key: "cudnn_conv_algo_search" value: "FASTEST" } } ] } }',
     "must be one of 0 (EXHAUSTIVE), 1 (HEURISTIC), 2 (DEFAULT)"),
    ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrrt" } ] } }',
     "expected 'tensorrt' or 'cuda'"),
    ('optimization { execution_accelerators { cpu_execution_accelerator [ { name: "openvino" } ] } }',
     "cpu_execution_accelerator 'openvino' is not available here"),
    ('parameters { key: "arena_extend_strategy" value: { string_value: "7" } }', "kNextPowerOfTwo"),
])
def test_bad_gpu_options_name_the_key_and_what_is_valid(text: str, expected: str) -> None:
    with pytest.raises(ModelLoadError, match="model 'm'") as err:
        gpu_options(_config('name: "m"\n' + text))
    assert expected in err.value.message


def test_bad_instance_groups_and_missing_gpu_provider() -> None:
    with pytest.raises(ModelLoadError, match=r"KIND_CPU group cannot list gpus \[0\]"):
        instance_plans(_config("instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]"))
    with pytest.raises(ModelLoadError, match="gpus must be distinct device ids >= 0"):
        instance_plans(_config("instance_group [ { kind: KIND_GPU gpus: [ 0, 0 ] } ]"))
    with pytest.raises(ModelLoadError, match="KIND_GPU needs CUDAExecutionProvider or TensorrtExecutionProvider") as err:
        provider_plan(InstancePlan(kind="KIND_GPU"), GpuOptions(), available=CPU_BUILD)
    assert "install onnxruntime-gpu" in err.value.message and "KIND_CPU" in err.value.message
    with pytest.raises(ModelLoadError, match="expected TensorrtExecutionProvider"):
        provider_plan(InstancePlan(kind="KIND_GPU"), GpuOptions(tensorrt={}), available=ALL[1:])


def _repo_with(tmp_path: Path, config: str) -> Path:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx")
    write_config(repo / "m", config)
    return repo


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="checks the CPU-only error")
async def test_kind_gpu_on_a_cpu_build_is_a_clear_load_error(tmp_path: Path) -> None:
    repo = _repo_with(tmp_path, 'max_batch_size: 8\ninstance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]')
    async with inprocess_server(repo, model_control_mode="explicit", strict_readiness=False) as (_, client):
        resp = await client.post("/v2/repository/models/m/load")
        assert resp.status_code == 400
        assert "KIND_GPU needs CUDAExecutionProvider" in resp.json()["error"]
        # a bad value: the same route, its own message
        write_config(repo / "m", 'max_batch_size: 8\nparameters { key: "gpu_mem_limit" '
                                 'value: { string_value: "-1" } }')
        resp = await client.post("/v2/repository/models/m/load")
        assert resp.status_code == 400 and "'gpu_mem_limit' must be a non-negative integer" in resp.json()["error"]


async def test_gpu_options_do_not_stop_cpu_instances_serving(tmp_path: Path) -> None:
    repo = _repo_with(tmp_path, TRT_CONFIG.replace('name: "m"', "max_batch_size: 8").replace(
        "kind: KIND_GPU count: 1 gpus: [ 1 ]", "kind: KIND_CPU count: 2"))
    async with inprocess_server(repo) as (server, client):
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        resp = await client.post("/v2/models/m/infer", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["data"] == [2, 4, 6, 8]
        assert server.core.model("m").pool.count == 2


def _variant(repo: Path, *, name: str = "m-fp16", parent: str = "m", version: int = 1) -> Path:
    path = scale_model(repo / name / str(version) / "model.onnx", factor=3.0)
    (repo / name / "metrics.json").write_text(json.dumps({"variant": "fp16", "parent": parent}))
    return path


def test_fp16_variant_is_chosen_only_on_gpu(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    fp32 = scale_model(repo / "m" / "1" / "model.onnx")
    assert fp16_variant_file(repo / "m", name="m", version=1) is None
    fp16 = _variant(repo)
    assert fp16_variant_file(repo / "m", name="m", version=1) == fp16
    assert fp16_variant_file(repo / "m", name="m", version=2) is None  # no such version of the variant
    assert instance_model_file(fp32, fp16=fp16, on_gpu=True, prefer_fp16=True) == fp16
    assert instance_model_file(fp32, fp16=fp16, on_gpu=False, prefer_fp16=True) == fp32
    assert instance_model_file(fp32, fp16=fp16, on_gpu=True, prefer_fp16=False) == fp32
    (repo / "m-fp16" / "metrics.json").write_text(json.dumps({"variant": "fp16", "parent": "other"}))
    assert fp16_variant_file(repo / "m", name="m", version=1) is None


def test_instance_setups_give_gpu_instances_the_fp16_file(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "models"
    fp32 = scale_model(repo / "m" / "1" / "model.onnx")
    fp16 = _variant(repo)
    config = _config("instance_group [ { kind: KIND_GPU gpus: [ 0 ] }, { kind: KIND_CPU } ]")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ALL[1:])  # pretend: a CUDA build
    setups = instance_setups(config, fp32=fp32, fp16=fp16, shown_as="m/1/model.onnx",
                             settings=ServerSettings(model_repository=repo))
    assert [(s.model_path, s.providers[0], s.shown_as) for s in setups] == [
        (fp16, "CUDAExecutionProvider", "m-fp16/1/model.onnx"), (fp32, "CPUExecutionProvider", "m/1/model.onnx")]


async def test_cpu_server_serves_fp32_although_a_variant_exists(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx")
    write_config(repo / "m", "max_batch_size: 8")
    _variant(repo)  # factor 3: answers would show it
    async with inprocess_server(repo) as (_, client):
        x = np.arange(4, dtype=np.float32)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x.tolist()}]}
        resp = await client.post("/v2/models/m/infer", json=body)
        assert resp.json()["outputs"][0]["data"] == (x * 2).tolist()


def test_offline_and_export_pick_providers_the_same_way(monkeypatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    assert choose_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]  # TensorRT only when asked
    assert choose_providers(requested=ALL) == ALL
    assert choose_providers(instance_kind="KIND_CPU") == ["CPUExecutionProvider"]


def _pretend_cuda(monkeypatch) -> None:
    """Our provider choice sees a CUDA build; ONNX Runtime itself (no CUDA here) falls back to its CPU
    provider with a warning, so the server's whole load path runs with GPU-placed instances."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ALL[1:])


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
async def test_gpu_instance_of_a_model_serves_its_fp16_variant(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx")
    write_config(repo / "m", "max_batch_size: 8\ninstance_group [ { kind: KIND_GPU } ]")
    _variant(repo)  # FP32 I/O like `modelserve optimize` writes, factor 3 so answers show which file ran
    _pretend_cuda(monkeypatch)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    for prefer, want in ((True, [3, 6, 9, 12]), (False, [2, 4, 6, 8])):
        async with inprocess_server(repo, gpu_fp16_variants=prefer, model_control_mode="explicit",
                                    load_model=["m"]) as (server, client):
            assert server.core.model("m").pool.path.parent.parent.name == ("m-fp16" if prefer else "m")
            assert (await client.post("/v2/models/m/infer", json=body)).json()["outputs"][0]["data"] == want


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
async def test_a_variant_with_other_io_types_falls_back_to_fp32(tmp_path: Path, monkeypatch, caplog) -> None:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx")
    write_config(repo / "m", "max_batch_size: 8\ninput [ { name: \"x\" data_type: TYPE_FP32 dims: [ 4 ] } ]")
    scale_model(repo / "m-fp16" / "1" / "model.onnx", dtype=TensorProto.FLOAT16)  # FP16 I/O: does not fit m
    (repo / "m-fp16" / "metrics.json").write_text(json.dumps({"variant": "fp16", "parent": "m"}))
    _pretend_cuda(monkeypatch)
    async with inprocess_server(repo, model_control_mode="explicit", load_model=["m"]) as (server, client):
        assert server.core.model("m").pool.path == repo / "m" / "1" / "model.onnx"
        assert "not serving its FP16 variant" in caplog.text and "FP16" in caplog.text
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        assert (await client.post("/v2/models/m/infer", json=body)).json()["outputs"][0]["data"] == [2, 4, 6, 8]


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
async def test_server_places_instances_on_each_listed_gpu(tmp_path: Path, monkeypatch, caplog) -> None:
    repo = _repo_with(tmp_path, TRT_CONFIG.replace('name: "m"', "max_batch_size: 8").replace(
        "count: 1 gpus: [ 1 ]", "count: 2 gpus: [ 0, 1 ]"))
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))  # a TensorRT build, pretended
    caplog.set_level("INFO", logger="modelserve.model")
    async with inprocess_server(repo) as (server, client):
        assert server.core.model("m").pool.count == 4
        assert "m v1: 4 instance(s)" in caplog.text
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        assert (await client.post("/v2/models/m/infer", json=body)).json()["outputs"][0]["data"] == [2, 4, 6, 8]
