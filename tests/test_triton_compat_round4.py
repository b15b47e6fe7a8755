"""Triton compatibility, round 4: feature parity found by driving a real server with the real tritonclient
(HTTP, HTTP aio, gRPC, gRPC aio) the way Triton users do, each mismatch fixed and shown here
(docs/RELIABILITY.md "Triton compatibility, round 4")."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures as cf
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from onnx import TensorProto
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from loadtests import triton_qa_models as qm
from service.model import ModelVersion
from service.modelrepo.config import read_config
from tests.conftest import free_port, run_server, wait_until
from tests.onnx_builders import slow_model, write_config
from tests.triton_models import _identity_config, identity_onnx, save_model
from tests.triton_sequence_models import simple_dyna_sequence

DTYPES = ("int32", "int32", "int32")
ADDSUB = "onnx_int32_int32_int32"
SIMPLE_ENSEMBLE, FAN_ENSEMBLE = f"simple_{ADDSUB}", f"fan_{ADDSUB}"
FAN_NOP = "nop_TYPE_INT32_-1"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton_round4") / "repo"
    repo.mkdir()
    qm.add_infer_models(repo, only=(DTYPES,))
    qm.add_infer_ensembles(repo, only=(DTYPES,))
    qm.add_simple_models(repo)  # simple_identity: BYTES
    save_model(repo / "identity_fp32", identity_onnx(TensorProto.FLOAT, ["N", "L"]),
               _identity_config("identity_fp32", "TYPE_FP32", "-1"))
    save_model(repo / "identity_bf16", identity_onnx(TensorProto.BFLOAT16, ["N", "L"]),
               _identity_config("identity_bf16", "TYPE_BF16", "-1"))
    slow_model(repo / "slow_timeout" / "1" / "model.onnx", repeats=300)
    write_config(repo / "slow_timeout", 'max_batch_size: 1\ndynamic_batching { default_queue_policy { '
                 'allow_timeout_override: true } }\ninstance_group [{ count: 1 kind: KIND_CPU }]\n')
    simple_dyna_sequence(repo)  # CORRID: UINT64
    slow_model(repo / "slow_full" / "1" / "model.onnx", repeats=300)
    write_config(repo / "slow_full", 'max_batch_size: 1\ndynamic_batching { default_queue_policy { '
                 'max_queue_size: 1 } }\ninstance_group [{ count: 1 kind: KIND_CPU }]\n')
    return repo


@pytest.fixture(scope="module")
def urls(repo):
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--model-control-mode", "explicit",
            "--load-model", SIMPLE_ENSEMBLE, "--load-model", FAN_ENSEMBLE, "--load-model", "simple_identity",
            "--load-model", "identity_fp32", "--load-model", "slow_timeout",
            "--load-model", "slow_full", "--load-model", "simple_dyna_sequence"]
    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}) as http_url:
        yield {"http": http_url, "grpc": f"127.0.0.1:{grpc_port}"}


@pytest.fixture(scope="module")
def clients(urls):
    return httpclient.InferenceServerClient(urls["http"]), grpcclient.InferenceServerClient(urls["grpc"])


def _ready(http: httpclient.InferenceServerClient) -> set[str]:
    return {row["name"] for row in http.get_model_repository_index() if row.get("state") == "READY"}


def test_server_metadata_lists_the_extensions_served_by_tritons_names(clients):
    http, grpc_ = clients
    for extensions in (http.get_server_metadata()["extensions"], list(grpc_.get_server_metadata().extensions)):
        for name in ("sequence", "model_configuration", "model_repository(unload_dependents)", "classification",
                     "model_repository", "statistics", "system_shared_memory", "trace", "logging"):
            assert name in extensions
        assert "cuda_shared_memory" not in extensions  # registering one is refused here


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unload_dependents_unloads_what_the_ensemble_loaded_along_with_it(clients, protocol):
    http, grpc_ = clients
    client = http if protocol == "http" else grpc_
    for name in (SIMPLE_ENSEMBLE, FAN_ENSEMBLE, ADDSUB, FAN_NOP):  # as the server started: none loaded by name
        http.unload_model(name)
    http.load_model(SIMPLE_ENSEMBLE)
    http.load_model(FAN_ENSEMBLE)
    assert {SIMPLE_ENSEMBLE, FAN_ENSEMBLE, ADDSUB, FAN_NOP} <= _ready(http)
    # The fan ensemble still calls the addsub model: it stays.
    client.unload_model(SIMPLE_ENSEMBLE, unload_dependents=True)
    assert SIMPLE_ENSEMBLE not in _ready(http) and ADDSUB in _ready(http)
    # Nothing calls them any more: the models loaded along with the ensembles go with the last one.
    client.unload_model(FAN_ENSEMBLE, unload_dependents=True)
    assert not {FAN_ENSEMBLE, ADDSUB, FAN_NOP} & _ready(http)
    assert not http.is_model_ready(ADDSUB) and not grpc_.is_model_ready(FAN_NOP)
    # Without the flag the composing models keep serving (as before, and as in Triton).
    client.load_model(SIMPLE_ENSEMBLE)
    client.unload_model(SIMPLE_ENSEMBLE)
    assert ADDSUB in _ready(http)
    # A model loaded by name is not the ensemble's to unload.
    client.load_model(ADDSUB)
    client.load_model(SIMPLE_ENSEMBLE)
    client.unload_model(SIMPLE_ENSEMBLE, unload_dependents=True)
    assert ADDSUB in _ready(http) and SIMPLE_ENSEMBLE not in _ready(http)
    http.load_model(SIMPLE_ENSEMBLE)


def test_unload_dependents_must_be_a_boolean(urls):
    reply = httpx.post(f"http://{urls['http']}/v2/repository/models/{SIMPLE_ENSEMBLE}/unload",
                       json={"parameters": {"unload_dependents": "yes"}})
    assert reply.status_code == 400 and "'unload_dependents' must be true or false" in reply.json()["error"]
    assert httpclient.InferenceServerClient(urls["http"]).is_model_ready(SIMPLE_ENSEMBLE)


def _bytes_request(module) -> list:
    tensor = module.InferInput("INPUT0", [1, 2], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    return [tensor]


def test_classification_of_a_bytes_output_is_tritons_invalid_argument_not_a_500(clients, urls):
    http, grpc_ = clients
    words = "class result not available for output due to unsupported type 'BYTES'"
    for module, client, status in ((httpclient, http, "400"), (grpcclient, grpc_, "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException, match=words) as info:
            client.infer("simple_identity", _bytes_request(module),
                         outputs=[module.InferRequestedOutput("OUTPUT0", class_count=1)])
        assert info.value.status() == status

    async def aio() -> None:
        for module, client in ((httpaio, httpaio.InferenceServerClient(urls["http"])),
                               (grpcaio, grpcaio.InferenceServerClient(urls["grpc"]))):
            try:
                with pytest.raises(InferenceServerException, match=words):
                    await client.infer("simple_identity", _bytes_request(module),
                                       outputs=[module.InferRequestedOutput("OUTPUT0", class_count=2)])
            finally:
                await client.close()

    asyncio.run(aio())
    stats = http.get_inference_statistics("simple_identity")["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] >= 4 and stats["success"]["count"] == 0


def test_classification_over_a_million_elements_per_row_is_refused_as_in_triton(clients):
    http, grpc_ = clients
    data = np.ones((1, 1_000_001), dtype=np.float32)
    for module, client in ((httpclient, http), (grpcclient, grpc_)):
        tensor = module.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException, match="classification output tensor too large"):
            client.infer("identity_fp32", [tensor], outputs=[module.InferRequestedOutput("OUTPUT0", class_count=5)])
    # Under the limit it ranks, as Triton's qa/L0_classification checks.
    tensor = httpclient.InferInput("INPUT0", [1, 8], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 8), dtype=np.float32))
    result = http.infer("identity_fp32", [tensor], outputs=[httpclient.InferRequestedOutput("OUTPUT0", class_count=5)])
    assert result.as_numpy("OUTPUT0").shape == (1, 5)
    assert all(v.decode().startswith("1.000000:") for v in result.as_numpy("OUTPUT0").ravel())


def test_model_config_names_instance_groups_and_says_where_they_run(clients):
    http, grpc_ = clients
    group = http.get_model_config("identity_fp32")["instance_group"][0]
    assert group["name"] == "identity_fp32_0" and group["kind"] == "KIND_CPU" and group["count"] == 1
    group = grpc_.get_model_config("identity_fp32", as_json=True)["config"]["instance_group"][0]
    assert group["name"] == "identity_fp32_0" and group["kind"] == "KIND_CPU"
    kind = grpc_.get_model_config("identity_fp32").config.instance_group[0].kind
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(kind) == "KIND_CPU"
    # An ensemble has no instances of its own, as in Triton.
    assert http.get_model_config(SIMPLE_ENSEMBLE)["instance_group"] == []


def test_a_bf16_graph_is_refused_at_load_with_the_reason(clients):
    http = clients[0]
    for client in clients:
        with pytest.raises(InferenceServerException, match="BF16 inputs and outputs are not served") as info:
            client.load_model("identity_bf16")
        assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    row = next(r for r in http.get_model_repository_index() if r["name"] == "identity_bf16")
    assert row["state"] == "UNAVAILABLE" and "tensor(bfloat16)" in row["reason"]
    assert "ValueError" not in row["reason"]


def test_cuda_shared_memory_registration_answers_as_triton_built_without_gpus(clients, urls):
    words = "failed to register CUDA shared memory region: 'cuda_r', GPUs not supported"
    for client, status in zip(clients, ("400", "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException, match=words) as info:
            client.register_cuda_shared_memory("cuda_r", base64.b64encode(b"handle"), 0, 8)
        assert info.value.status() == status
        assert "use system shared memory" in info.value.message()

    async def aio() -> None:
        client = grpcaio.InferenceServerClient(urls["grpc"])
        try:
            with pytest.raises(InferenceServerException, match=words):
                await client.register_cuda_shared_memory("cuda_r", base64.b64encode(b"handle"), 0, 8)
        finally:
            await client.close()

    asyncio.run(aio())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_clearing_trace_settings_restores_start_up_then_global_values(clients, protocol):
    """Triton's qa/L0_trace trace_endpoint_test.py clear-settings case: a null global setting goes back to the
    value the server started with, a null model setting back to the global one."""
    http, grpc_ = clients
    client = http if protocol == "http" else grpc_

    def settings(model: str | None = None) -> dict:
        if protocol == "http":
            return http.get_trace_settings(model_name=model)
        got = grpc_.get_trace_settings(model_name=model).settings
        return {k: (list(v.value) if k == "trace_level" else v.value[0]) for k, v in got.items()}

    start = settings()
    client.update_trace_settings(model_name="identity_fp32", settings={"trace_rate": "12", "log_frequency": "34"})
    client.update_trace_settings(settings={"trace_rate": "56", "trace_count": "78", "trace_level": ["OFF"]})
    client.update_trace_settings(settings={"trace_rate": None, "trace_count": None})
    assert settings() == {**start, "trace_level": ["OFF"]}
    model = settings("identity_fp32")
    assert (model["trace_rate"], model["log_frequency"], model["trace_count"]) == ("12", "34", start["trace_count"])
    client.update_trace_settings(model_name="identity_fp32", settings={"trace_rate": None, "trace_level": None})
    assert settings("identity_fp32") == {**start, "trace_level": ["OFF"], "log_frequency": "34"}
    client.update_trace_settings(model_name="identity_fp32", settings={"log_frequency": None})
    client.update_trace_settings(settings={"trace_level": None})
    assert settings() == start == settings("identity_fp32")


def test_served_config_says_kind_gpu_for_instances_on_a_cuda_provider(repo):
    """No GPU here: the served config of a version whose instances run on CUDA, from its spec and providers."""
    config = read_config(repo / "identity_fp32")[0]
    config.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    config.instance_group.add(count=2, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO, name="mine")
    version = SimpleNamespace(spec=SimpleNamespace(config=config),
                              pool=SimpleNamespace(providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    served = ModelVersion.served_config.func(version)  # type: ignore[attr-defined]
    kinds = [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in served.instance_group]
    assert [g.name for g in served.instance_group] == ["identity_fp32_0", "mine"] and kinds == ["KIND_GPU"] * 2
    assert config.instance_group[1].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO  # the spec is untouched


def _pending(url: str, model: str) -> float:
    series = f'nv_inference_pending_request_count{{model="{model}",version="1"}} '
    lines = httpx.get(f"http://{url}/metrics", timeout=30).text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(series)), 0.0)


def _slow_request(module) -> list:
    tensor = module.InferInput("x", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 1), dtype=np.float32))
    return [tensor]


def test_a_queue_policy_timeout_is_tritons_unavailable_request_timeout_expired(clients, urls):
    """Triton's QA test of queue-policy timeouts: UNAVAILABLE "Request timeout expired" (was DEADLINE_EXCEEDED,
    which a gRPC client reads as its own deadline passing)."""
    grpc_ = clients[1]
    with cf.ThreadPoolExecutor(4) as pool:
        blockers = [pool.submit(httpclient.InferenceServerClient(urls["http"], network_timeout=300).infer,
                                "slow_timeout", _slow_request(httpclient)) for _ in range(3)]
        wait_until(lambda: _pending(urls["http"], "slow_timeout") >= 1, what="a request queued behind a running one")
        late = {"grpc": pool.submit(grpc_.infer, "slow_timeout", _slow_request(grpcclient), timeout=1000),
                "http": pool.submit(httpclient.InferenceServerClient(urls["http"]).infer, "slow_timeout",
                                    _slow_request(httpclient), timeout=1000)}
        for protocol, status in (("grpc", "StatusCode.UNAVAILABLE"), ("http", "503")):
            with pytest.raises(InferenceServerException) as info:
                late[protocol].result()
            assert info.value.status() == status
            assert info.value.message().startswith("Request timeout expired: ")
            assert "timed out in the queue" in info.value.message()
        for blocker in blockers:
            blocker.result()



def _infer_or_error(module, url: str) -> InferenceServerException | None:
    try:
        module.InferenceServerClient(url).infer("slow_full", _slow_request(module))
    except InferenceServerException as exc:
        return exc
    return None


def test_a_full_queue_is_tritons_unavailable_exceeds_maximum_queue_size(urls):
    """One running, one queued (max_queue_size 1): of three HTTP and three gRPC requests sent at once, at least
    one of each is refused, with Triton's status and words."""
    calls = [(httpclient, urls["http"])] * 3 + [(grpcclient, urls["grpc"])] * 3
    with cf.ThreadPoolExecutor(len(calls)) as pool:
        errors = list(pool.map(lambda call: _infer_or_error(*call), calls))
    refused = {"503": 0, "StatusCode.UNAVAILABLE": 0}
    for error in errors:
        if error is not None:
            assert error.message().startswith("Exceeds maximum queue size: "), error.message()
            refused[error.status()] += 1
    assert refused["503"] >= 1 and refused["StatusCode.UNAVAILABLE"] >= 1, errors


def _sequence_step(module, value: int) -> list:
    tensor = module.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


def test_a_string_correlation_id_for_an_integer_corrid_is_refused_with_tritons_words(clients):
    """qa/L0_sequence_corrid_batcher test_corrid_data_type: a string id to a model whose CORRID is UINT64."""
    words = ("sequence batching control 'CORRID' data-type is 'BYTES', but model 'simple_dyna_sequence' expects "
             "'UINT64'")
    for module, client, status in ((httpclient, clients[0], "400"),
                                   (grpcclient, clients[1], "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException, match=words) as info:
            client.infer("simple_dyna_sequence", _sequence_step(module, 1), sequence_id="corrid", sequence_start=True)
        assert info.value.status() == status
        with pytest.raises(InferenceServerException, match=words):  # any step of it, refused before queueing
            client.infer("simple_dyna_sequence", _sequence_step(module, 2), sequence_id="corrid", sequence_end=True)
        # An integer id runs: OUTPUT = INPUT + START, then INPUT + END * CORRID.
        started = client.infer("simple_dyna_sequence", _sequence_step(module, 5), sequence_id=123, sequence_start=True)
        ended = client.infer("simple_dyna_sequence", _sequence_step(module, 5), sequence_id=123, sequence_end=True)
        assert started.as_numpy("OUTPUT").item() == 6 and ended.as_numpy("OUTPUT").item() == 128


def test_unknown_input_and_output_names_get_tritons_words(clients):
    for module, client in zip((httpclient, grpcclient), clients):
        wrong = module.InferInput("WRONG", [1, 2], "FP32")
        wrong.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        with pytest.raises(InferenceServerException,
                           match="unexpected inference input 'WRONG' for model 'identity_fp32'"):
            client.infer("identity_fp32", [wrong])
        right = module.InferInput("INPUT0", [1, 2], "FP32")
        right.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        with pytest.raises(InferenceServerException,
                           match="unexpected inference output 'NOPE' for model 'identity_fp32'"):
            client.infer("identity_fp32", [right], outputs=[module.InferRequestedOutput("NOPE")])


@pytest.mark.parametrize("sequence_id", [-5, "-7", "99999999999999999999999"])
def test_a_correlation_id_outside_the_corrid_type_is_a_400_not_a_500(urls, sequence_id):
    """HTTP JSON can carry what tritonclient cannot: ids a UINT64 CORRID cannot hold (was 500 "inference failed:
    Python integer -5 out of bounds for uint64", raised while the batch was built)."""
    body = {"inputs": [{"name": "INPUT", "shape": [1, 1], "datatype": "INT32", "data": [1]}],
            "parameters": {"sequence_id": sequence_id, "sequence_start": True}}
    reply = httpx.post(f"http://{urls['http']}/v2/models/simple_dyna_sequence/infer", json=body)
    assert reply.status_code == 400, reply.text
    assert "does not fit the CORRID control of model 'simple_dyna_sequence' (UINT64" in reply.json()["error"]


def test_a_corrid_control_of_another_type_fails_to_load_with_the_reason(repo, clients):
    folder = repo / "corrid_fp32"
    simple_dyna_sequence(repo, name="corrid_fp32")
    config = (folder / "config.pbtxt").read_text().replace("data_type: TYPE_UINT64", "data_type: TYPE_FP32")
    (folder / "config.pbtxt").write_text(config)
    with pytest.raises(InferenceServerException,
                       match=r"a CORRID control's data_type must be one of TYPE_UINT64, .*got TYPE_FP32") as info:
        clients[0].load_model("corrid_fp32")
    assert info.value.status() == "400"
