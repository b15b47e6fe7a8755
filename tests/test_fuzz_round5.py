"""Round 5 (docs/RELIABILITY.md "Fuzzing and isolation, round 5"): property-based fuzzing through a real server
with an oracle, each problem it found as a regression test, and isolation of valid requests from bad ones in
the same batches. Real subprocess servers, real clients (httpx, tritonclient, a raw gRPC channel)."""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as pb

from loadtests.fuzz_v2 import Target, check_case, choices, specs_from_server
from loadtests.fuzz_v2_cases import Spec, cases
from loadtests.fuzz_v2_models import build_fuzz_models
from loadtests.fuzz_v2_tasks import check_task, task_models, task_request
from loadtests.isolation import build_isolation_models, scenario
from loadtests.serverproc import serve
from tests.conftest import free_port, run_server


@dataclass
class Served:
    url: str
    grpc_url: str
    repo: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = build_fuzz_models(tmp_path_factory.mktemp("fuzz5") / "models")
    port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(port)]) as url:
        yield Served(url, f"127.0.0.1:{port}", repo)


@pytest.fixture(scope="module")
def target(served: Served) -> Iterator[tuple[Target, dict[str, Spec]]]:
    with httpx.Client(base_url=f"http://{served.url}", timeout=60) as http, \
            grpc.insecure_channel(served.grpc_url) as channel:
        yield Target(http, channel), specs_from_server(http, served.repo, strict=True)


@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_request_is_answered_right_or_refused_alike_on_every_transport(target, data):
    client, specs = target
    case = data.draw(cases(specs), label="case")
    assert check_case(client, case, specs[case.model], data.draw(choices, label="transports")) == []


def _infer(url: str, model: str, inputs: list[dict]) -> httpx.Response:
    return httpx.post(f"http://{url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=30)


@pytest.mark.parametrize(("model", "name", "datatype", "shape", "data", "words"), [
    # Before: 200 with True (numpy reads any non-empty string, and any non-zero number, as True).
    ("not", "x", "BOOL", [1, 2], ["false", "false"], "'data' for BOOL must hold true or false; element 0 is "
                                                        "the string 'false'"),
    ("not", "x", "BOOL", [1, 2], [0, 2], "must hold true or false; element 0 is 0"),
    # Before: 200 with 1.0 and NaN.
    ("scale", "x", "FP32", [1, 4], ["1", 2, 3, 4], "'data' for FP32 must hold numbers; element 0 is the string '1'"),
    ("scale", "x", "FP32", [1, 4], [1, None, 3, 4], "must hold numbers; element 1 is null"),
    ("scale", "x", "FP32", [1, 4], [True] * 4, "must hold numbers; element 0 is true"),
    # Before: 200 with 1 (truncated).
    ("id_int32", "INPUT0", "INT32", [1, 2], [1, 2.5], "'data' for INT32 must hold integers; element 1 is 2.5"),
    # Before: 200 with the text "True".
    ("strings", "x", "BYTES", [1, 1], [True], "BYTES data holds true; expected strings"),
])
def test_a_json_value_of_the_wrong_type_is_refused_saying_what_was_expected(served, model, name, datatype, shape,
                                                                            data, words):
    resp = _infer(served.url, model, [{"name": name, "shape": shape, "datatype": datatype, "data": data}])
    assert resp.status_code == 400 and words in resp.json()["error"], resp.text


def test_json_values_that_keep_their_value_are_still_taken(served):
    resp = _infer(served.url, "id_int32", [{"name": "INPUT0", "shape": [1, 3], "datatype": "INT32",
                                            "data": [[1, 2.0, -3]]}])
    assert resp.status_code == 200 and resp.json()["outputs"][0]["data"] == [1, 2, -3]
    resp = _infer(served.url, "id_uint64", [{"name": "INPUT0", "shape": [1, 1], "datatype": "UINT64",
                                             "data": [2**64 - 1]}])
    assert resp.status_code == 200 and resp.json()["outputs"][0]["data"] == [2**64 - 1]


def test_an_empty_input_the_graph_cannot_run_on_is_a_4xx_on_http_and_grpc(served):
    # Before: 500 / INTERNAL "inference failed (RuntimeException)": ArgMax over a dimension of 0 elements.
    empty = [{"name": n, "shape": [1, 0], "datatype": "FP32", "data": []} for n in ("a", "b")]
    resp = _infer(served.url, "two_io", empty)
    assert resp.status_code == 400, resp.text
    assert "cannot run on an empty input: input 'a' has shape [1, 0]" in resp.json()["error"]
    request = pb.ModelInferRequest(model_name="two_io")
    for n in ("a", "b"):
        request.inputs.add(name=n, datatype="FP32", shape=[1, 0])
        request.raw_input_contents.append(b"")
    with grpc.insecure_channel(served.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            infer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty input" in info.value.details()
    # The same model still answers a non-empty request.
    ok = _infer(served.url, "two_io", [{"name": n, "shape": [1, 2], "datatype": "FP32", "data": [1, 3]}
                                       for n in ("a", "b")])
    assert ok.status_code == 200 and np.allclose(ok.json()["outputs"][0]["data"], [2, 6])


@pytest.fixture(scope="module")
def isolation_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = build_isolation_models(tmp_path_factory.mktemp("isolation5") / "models")
    port = free_port()
    args = ["--grpc-port", str(port), "--model-control-mode", "explicit", "--load-model", "*"]
    with run_server(repo, extra_args=args) as url:
        yield Served(url, f"127.0.0.1:{port}", repo)


async def _batch_sizes(url: str) -> dict[str, set[int]]:
    async with httpx.AsyncClient(timeout=30) as http:
        stats = (await http.get(f"http://{url}/v2/models/stats")).json()["model_stats"]
    return {m["name"]: {b["batch_size"] for b in m["batch_stats"]} for m in stats}


async def test_valid_requests_get_their_own_answers_while_hostile_ones_share_their_batches(isolation_server):
    tally = await scenario(isolation_server.url, isolation_server.grpc_url, requests=30)
    assert tally.problems == [], tally.problems
    assert tally.valid == {"answered right": 4 * 30}
    kinds = {key.split(":")[0] for key in tally.hostile}
    assert kinds == {"json_type", "binary_size", "grpc_short", "bad_index", "cut_body", "hang_up", "grpc_cancel",
                     "grpc_timeout"}
    # The batchers did form batches of several requests, so valid and hostile rows did share them.
    sizes = await _batch_sizes(isolation_server.url)
    assert max(sizes["scale"]) > 1 and max(sizes["gather"]) > 1, sizes


async def test_valid_requests_during_unload_and_load_are_answered_or_told_not_ready(isolation_server):
    tally = await scenario(isolation_server.url, isolation_server.grpc_url, requests=30, churn_rounds=2)
    assert tally.problems == [], tally.problems
    assert sum(tally.valid.values()) == 4 * 30  # answered right, or refused 503 / UNAVAILABLE "not ready"
    async with httpx.AsyncClient(base_url=f"http://{isolation_server.url}", timeout=30) as http:
        after = await http.post("/v2/models/scale/infer", json={"inputs": [{"name": "x", "shape": [1, 4],
                                                                           "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert after.status_code == 200 and after.json()["outputs"][0]["data"] == [2, 4, 6, 8]


@pytest.fixture(scope="module")
def zoo_http(zoo_server: str) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    with httpx.Client(base_url=f"http://{zoo_server}", timeout=60) as http:  # the session's shared zoo server
        yield http, task_models(http)


@settings(max_examples=30, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_task_routes_and_embeddings_answer_or_refuse_with_a_message(zoo_http, data):
    http, models = zoo_http
    path, body = data.draw(task_request(models), label="request")
    assert check_task(http, path, body, counts=Counter()) == []


async def test_sigterm_amid_hostile_traffic_answers_or_refuses_every_valid_request_clearly(tmp_path):
    repo = build_isolation_models(tmp_path / "models")
    with serve(repo, log_path=tmp_path / "server.log", grpc=True) as server:
        tally = await scenario(server.url, server.grpc_url or "", requests=30, sigterm_pid=server.pid)
    assert tally.problems == [], tally.problems
    assert tally.stopping and tally.valid["answered right"] >= 40  # a third of the 120 came before the signal
    assert sum(tally.valid.values()) == 4 * 30


def test_an_image_whose_ink_vanishes_in_the_resize_is_a_400_not_a_500(zoo_http):
    # Before: 500 "could not broadcast input array from shape (20,20) into shape (0,0)": a 13x1 PNG's sliver of
    # ink left no mass in the 20x20 box, its centre of mass was NaN. Round 5 answered it; since round 6 an image
    # under 8 pixels on a side holds no digit and is refused, saying the size expected.
    http, models = zoo_http
    assert models.get("cnn") == "image-classification"
    # The 13x1 greyscale PNG hypothesis drew.
    png = ("iVBORw0KGgoAAAANSUhEUgAAAA0AAAABCAAAAAAgQnvbAAAAFklEQVR4nGPovv25+MK0PI4utpyPbwE2XweD8H3dAwAAAABJRU5Er"
           "kJggg==")
    assert Image.open(io.BytesIO(base64.b64decode(png))).size == (13, 1)
    resp = http.post("/v1/models/cnn/predict", json={"images": [png]})
    assert resp.status_code == 400, resp.text
    assert "13x1 pixels is too small to hold a digit; expected at least 8x8" in resp.json()["error"]
