"""What Triton's own QA tests (qa/L0_http, qa/L0_grpc, qa/L0_input_validation) found different, fixed, and
shown here with the real tritonclient against a real server; plus the runner that measures those QA files
(loadtests/triton_qa_runner.py) on a unittest file of our own."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from loadtests import triton_qa_models as qm
from loadtests.triton_qa_report import Row, grouped_reasons, render
from tests.conftest import REPO_ROOT, free_port, run_server
from tests.inprocess import inprocess_server


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton_qa") / "repo"
    repo.mkdir()
    qm.add_simple_models(repo)
    qm.add_input_validation_models(repo)
    return repo


@pytest.fixture(scope="module")
def urls(repo):
    grpc_port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(grpc_port)]) as http_url:
        yield {"http": http_url, "grpc": f"127.0.0.1:{grpc_port}"}


def _simple_inputs(module) -> list:
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"), module.InferInput("INPUT1", [1, 16], "INT32")]
    for i in inputs:
        i.set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    return inputs


def test_load_and_unload_outside_explicit_mode_are_unavailable_as_in_triton(urls):
    g = grpcclient.InferenceServerClient(urls["grpc"])
    h = httpclient.InferenceServerClient(urls["http"])
    for call in (g.load_model, g.unload_model, h.load_model, h.unload_model):
        with pytest.raises(InferenceServerException,
                           match="explicit model load / unload is not allowed if polling is enabled") as info:
            call("simple")
        assert info.value.status() in ("StatusCode.UNAVAILABLE", "503")
        assert "--model-control-mode explicit" in info.value.message()
    assert h.is_model_ready("simple") and g.is_model_ready("simple")


def test_cuda_shared_memory_lists_none_and_unregisters_nothing(urls):
    h = httpclient.InferenceServerClient(urls["http"])
    g = grpcclient.InferenceServerClient(urls["grpc"])
    assert h.get_cuda_shared_memory_status() == []
    assert len(g.get_cuda_shared_memory_status().regions) == 0
    h.unregister_cuda_shared_memory()
    h.unregister_cuda_shared_memory("region")
    g.unregister_cuda_shared_memory()
    with pytest.raises(InferenceServerException, match="Unable to find cuda shared memory region: 'r'") as info:
        g.get_cuda_shared_memory_status("r")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="Unable to find cuda shared memory region: 'r'") as info:
        h.get_cuda_shared_memory_status("r")
    assert info.value.status() == "400"
    # Registering still says why it cannot.
    with pytest.raises(InferenceServerException, match="CUDA shared memory is not supported") as info:
        g.register_cuda_shared_memory("r", base64.b64encode(b"handle"), 0, 8)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_duplicate_outputs_use_tritons_words_on_both_transports(urls):
    g = grpcclient.InferenceServerClient(urls["grpc"])
    h = httpclient.InferenceServerClient(urls["http"])
    for module, client in ((grpcclient, g), (httpclient, h)):
        outputs = [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT0")]
        with pytest.raises(InferenceServerException) as info:
            client.infer("simple", _simple_inputs(module), outputs=outputs)
        assert "output 'OUTPUT0' already exists in request" in info.value.message()  # Triton's gRPC text
        assert "Duplicate output name 'OUTPUT0' is not allowed in a request" in info.value.message()  # its HTTP one
        assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")


def test_qa_input_validation_models_name_missing_inputs(urls):
    """The repository loadtests/triton_qa.py builds for L0_input_validation serves what those tests expect."""
    g = grpcclient.InferenceServerClient(urls["grpc"])
    result = g.infer("input_all_optional", [])
    assert result.as_numpy("OUTPUT0").tolist() == [0.0]
    one = grpcclient.InferInput("INPUT0", [1], "FP32")
    one.set_data_from_numpy(np.ones(1, dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"expected number of inputs between 3 and 4 but got 1 inputs"
                                                       r" for model 'input_optional'"):
        g.infer("input_optional", [one])


def test_restricted_apis_answer_with_tritons_words(repo):
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port),
            "--grpc-restricted-protocol", "inference,health:infer-key=infer-value",
            "--http-restricted-api", "model-repository:admin-key=admin-value"]
    with run_server(repo, extra_args=args) as http_url:
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        with pytest.raises(InferenceServerException, match="This protocol is restricted, expecting header "
                                                           "'triton-grpc-protocol-infer-key'") as info:
            g.is_server_live()
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        assert g.is_server_live(headers={"triton-grpc-protocol-infer-key": "infer-value"})
        g.infer("simple", _simple_inputs(grpcclient), headers={"triton-grpc-protocol-infer-key": "infer-value"})
        h = httpclient.InferenceServerClient(http_url)
        with pytest.raises(InferenceServerException,
                           match="This API is restricted, expecting header 'admin-key'") as info:
            h.get_model_repository_index()
        assert info.value.status() == "403"
        assert h.get_model_repository_index(headers={"admin-key": "admin-value"})


def test_raw_and_typed_contents_on_one_input_are_refused_in_tritons_words(urls):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(urls["grpc"]))
    request = service_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        tensor.contents.int_contents[:] = list(range(16))
    request.raw_input_contents.append(np.arange(8, dtype=np.int32).tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("contents field must not be specified when using raw_input_contents for 'INPUT0' for model 'simple'"
            in info.value.details())


def test_a_version_that_is_not_a_number_is_a_400_in_tritons_words(urls):
    g = grpcclient.InferenceServerClient(urls["grpc"])
    h = httpclient.InferenceServerClient(urls["http"])
    for module, client in ((grpcclient, g), (httpclient, h)):
        with pytest.raises(InferenceServerException, match="failed to get model version from specified version "
                                                           "string 'wrong_specification'") as info:
            client.infer("simple", _simple_inputs(module), model_version="wrong_specification")
        assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert h.infer("simple", _simple_inputs(httpclient), model_version="1").as_numpy("OUTPUT0").tolist() == [[2] * 16]


async def test_loading_a_model_the_repository_lacks_says_failed_to_load(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    qm.add_simple_models(repo)
    async with inprocess_server(repo, model_control_mode="explicit") as (_, client):
        resp = await client.post("/v2/repository/models/wrong_model_name/load")
        assert resp.status_code == 404
        assert resp.json()["error"].startswith("failed to load 'wrong_model_name': no model 'wrong_model_name'")


async def test_load_override_paths_too_long_or_outside_a_version_are_invalid_file_paths(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    qm.add_simple_models(repo)
    port = free_port()
    async with inprocess_server(repo, model_control_mode="explicit", grpc_port=port):
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            for path in ("file:" + "A" * 256, "file:1/" + "A" * 256):
                with pytest.raises(InferenceServerException, match="Invalid file path") as info:
                    await client.load_model("simple", config="{}", files={path: b"a"})
                assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert await client.is_server_live()
        finally:
            await client.close()


UNITTEST_FILE = '''
import unittest

class Collector(unittest.TestCase):
    # As Triton's TestResultCollector: run() reads unittest's own result object.
    def run(self, result=None):
        result = super().run(result)
        self.__class__.seen = result.testsRun
        return result

class Cases(Collector):
    def test_pass(self):
        self.assertTrue(True)

    def test_fail(self):
        self.assertEqual(1, 2, "one is not two")

    def test_error(self):
        raise RuntimeError("boom")

    def test_subtests(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertNotEqual(i, 1)

    @unittest.skip("not here")
    def test_skipped(self):
        pass

    def test_heavy(self):
        raise MemoryError

class Other(unittest.TestCase):
    def test_other(self):
        pass
'''


def test_runner_records_each_case_of_a_unittest_file(tmp_path):
    (tmp_path / "qa_like_test.py").write_text(textwrap.dedent(UNITTEST_FILE))
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-m", "loadtests.triton_qa_runner", "--file", str(tmp_path / "qa_like_test.py"),
                    "--out", str(out), "--only-class", "Cases", "--deselect", "test_heavy=needs too much memory"],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    outcomes = {k.rsplit(".", 1)[-1]: v for k, v in json.loads(out.read_text()).items()}
    assert {k: v["outcome"] for k, v in outcomes.items()} == {
        "test_pass": "passed", "test_fail": "failed", "test_error": "error", "test_subtests": "failed",
        "test_skipped": "skipped", "test_heavy": "skipped"}
    assert "one is not two" in outcomes["test_fail"]["detail"]
    assert "(i=1)" in outcomes["test_subtests"]["detail"]
    assert outcomes["test_heavy"]["detail"] == "not run: needs too much memory"


def test_report_counts_rates_and_groups_reasons():
    rows = [Row("a_test.py", {"m.C.test_1": {"outcome": "passed", "detail": ""},
                              "m.C.test_2": {"outcome": "failed",
                                             "detail": "Traceback\n  File x\nAssertionError: 'modelserve' != 'triton'"},
                              "m.C.test_3": {"outcome": "skipped", "detail": "not run: heavy"}}),
            Row("client.py -d", {"client.py -d": {"outcome": "failed",
                                                 "detail": "FAILED : get_server_metadata\nUnclosed connector"}}),
            Row("b_test.py", note="not run: starts its own server")]
    table = render(rows, header=True, total=True)
    assert "| a_test.py | 3 | 1 | 1 | 1 | 50% |" in table
    assert "| b_test.py | 0 | 0 | 0 | 0 | not run: starts its own server |" in table
    assert "| **all** | 4 | 1 | 2 | 1 | 33% |" in table
    reasons = grouped_reasons(rows)
    assert "AssertionError: 'modelserve' != 'triton'\n    test_2" in reasons
    assert "FAILED : get_server_metadata\n    client.py -d" in reasons
