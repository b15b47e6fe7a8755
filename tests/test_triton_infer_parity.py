"""What Triton's qa/L0_infer/infer_test.py relies on, shown with the real tritonclient against a real server
holding the harness's L0_infer models (loadtests/triton_qa_models.add_infer_models): version policies pick the
latest served version, classification answers "value:index:label" per row (shape [k] without batching), strings
are cast by the graph, gRPC streaming and system shared memory carry the same tensors, and the simple_/sequence_/
fan_ ensembles answer as their addsub model does (labels taken from it; a non-batching ensemble calls its batching
nop models with a batch of one)."""

from __future__ import annotations

from functools import partial
from queue import Queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from loadtests import triton_qa_models as qm
from tests.conftest import free_port, run_server

SUBSET = (("int8", "int8", "int8"), ("int32", "int32", "int32"), ("float16", "float16", "float16"),
          ("object", "object", "int32"), ("int32", "object", "object"))


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton_infer") / "repo"
    repo.mkdir()
    qm.add_infer_models(repo, only=SUBSET)
    qm.add_infer_ensembles(repo, only=SUBSET)
    # A non-batching ensemble whose tensors already carry the batching step's batch dim.
    (repo / "full_shape_nobatch" / "1").mkdir(parents=True)
    (repo / "full_shape_nobatch" / "config.pbtxt").write_text(
        'name: "full_shape_nobatch"\nplatform: "ensemble"\nmax_batch_size: 0\n'
        'input [ { name: "A" data_type: TYPE_INT8 dims: [ -1, 16 ] }, { name: "B" data_type: TYPE_INT8 dims: [ -1, 16 ] } ]\n'
        'output [ { name: "DIFF" data_type: TYPE_INT8 dims: [ -1, 16 ] } ]\n'
        'ensemble_scheduling { step [ { model_name: "onnx_int8_int8_int8" model_version: -1 '
        'input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" } '
        'output_map { key: "OUTPUT0" value: "DIFF" } } ] }\n')
    grpc_port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(grpc_port), "--allow-client-shm", "true"]) as http_url:
        yield {"http": http_url, "grpc": f"127.0.0.1:{grpc_port}"}


def _inputs(module, a: np.ndarray, b: np.ndarray, datatype: str, **kw) -> list:
    inputs = [module.InferInput("INPUT0", list(a.shape), datatype), module.InferInput("INPUT1", list(b.shape), datatype)]
    inputs[0].set_data_from_numpy(a, **kw)
    inputs[1].set_data_from_numpy(b, **kw)
    return inputs


def _int8_pair(shape) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(-60, 60, size=shape).astype(np.int8), rng.integers(-60, 60, size=shape).astype(np.int8))


def test_builder_names_every_model_as_gen_qa_models_does(tmp_path):
    qm.add_infer_models(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert len(names) == 2 * len(qm.ADDSUB_MODELS) == 40
    assert {"onnx_int32_int32_int32", "onnx_nobatch_int32_int32_int32", "onnx_object_int32_object",
            "onnx_nobatch_int32_float16_int16", "onnx_float16_float32_float32"} <= names
    assert sorted(p.name for p in (tmp_path / "onnx_float32_float32_float32").iterdir() if p.is_dir()) == ["1", "2", "3"]
    assert [p.name for p in (tmp_path / "onnx_int64_int64_int64").iterdir() if p.is_dir()] == ["1"]


def test_version_policy_serves_the_latest_version_and_names_the_missing_one(urls):
    client = httpclient.InferenceServerClient(urls["http"])
    assert client.get_model_metadata("onnx_int8_int8_int8")["versions"] == ["3"]
    a, b = _int8_pair((1, 16))
    result = client.infer("onnx_int8_int8_int8", _inputs(httpclient, a, b, "INT8"))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a - b)  # versions 2 and 3 swap sum and difference
    assert result.get_response()["model_version"] == "3"
    with pytest.raises(InferenceServerException) as info:  # infer_test.py checks message().startswith(...)
        client.infer("onnx_int8_int8_int8", _inputs(httpclient, a, b, "INT8"), model_version="1")
    assert info.value.message().startswith("Request for unknown model: 'onnx_int8_int8_int8' version 1")
    g = grpcclient.InferenceServerClient(urls["grpc"])
    a32, b32 = a.astype(np.int32), b.astype(np.int32)
    for version, expected in (("1", a32 + b32), ("2", a32 - b32), ("", a32 - b32)):  # policy "all": newest by default
        out = g.infer("onnx_int32_int32_int32", _inputs(grpcclient, a32, b32, "INT32"), model_version=version)
        np.testing.assert_array_equal(out.as_numpy("OUTPUT0"), expected)
    np.testing.assert_array_equal(  # specific [1]: only the unswapped version 1 is served
        client.infer("onnx_float16_float16_float16", _inputs(httpclient, a.astype(np.float16), b.astype(np.float16),
                                                             "FP16")).as_numpy("OUTPUT0"), (a32 + b32).astype(np.float16))


@pytest.mark.parametrize("binary", [True, False])
def test_classification_gives_value_index_label_per_row(urls, binary):
    client = httpclient.InferenceServerClient(urls["http"])
    a, b = _int8_pair((16,))
    out = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary, class_count=3)]
    nobatch = client.infer("onnx_nobatch_int8_int8_int8", _inputs(httpclient, a, b, "INT8", binary_data=binary),
                           outputs=out).as_numpy("OUTPUT0")
    assert nobatch.shape == (3,)
    expected = (a.astype(np.int32) - b).astype(np.int8)
    top = np.argsort(-expected.astype(np.int32), kind="stable")[:3]
    values = [x.decode() if isinstance(x, bytes) else x for x in nobatch]
    assert [float(v.split(":")[0]) for v in values] == [float(expected[i]) for i in top]
    for v in values:
        value, index, label = v.split(":")
        assert float(value) == expected[int(index)] and label == f"label{index}"
    a2, b2 = _int8_pair((2, 16))
    batched = client.infer("onnx_int8_int8_int8", _inputs(httpclient, a2, b2, "INT8", binary_data=binary),
                           outputs=out).as_numpy("OUTPUT0")
    assert batched.shape == (2, 3)


def test_strings_cast_by_the_graph_over_grpc_streaming(urls):
    client = grpcclient.InferenceServerClient(urls["grpc"])
    results: Queue = Queue()
    client.start_stream(partial(lambda q, result, error: q.put((result, error)), results))
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([[str(-i) for i in range(16)]], dtype=object)
    try:
        client.async_stream_infer("onnx_object_object_int32", _inputs(grpcclient, a, b, "BYTES"), request_id="7")
        result, error = results.get(timeout=30)
    finally:
        client.stop_stream()
    assert error is None
    assert result.get_response().id == "7"
    assert list(result.as_numpy("OUTPUT0")[0]) == [b"0"] * 16
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1")[0], 2 * np.arange(16, dtype=np.int32))
    ints = np.arange(16, dtype=np.int32).reshape(1, 16)
    http = httpclient.InferenceServerClient(urls["http"]).infer(
        "onnx_int32_object_object", _inputs(httpclient, ints, ints, "INT32", binary_data=False))
    assert [x.decode() if isinstance(x, bytes) else x for x in http.as_numpy("OUTPUT0")[0]] == [
        str(2 * i) for i in range(16)]


def test_system_shared_memory_inputs_and_outputs_as_infer_util_uses_them(urls):
    client = grpcclient.InferenceServerClient(urls["grpc"])
    a, b = (np.arange(16, dtype=np.int32).reshape(1, 16), np.full((1, 16), 3, dtype=np.int32))
    names = ("l0infer_in0", "l0infer_in1", "l0infer_out0", "l0infer_out1")
    handles = [shm.create_shared_memory_region(n + "_data", "/" + n, 64) for n in names]
    try:
        shm.set_shared_memory_region(handles[0], [a])
        shm.set_shared_memory_region(handles[1], [b])
        for n in names:
            client.register_system_shared_memory(n + "_data", "/" + n, 64)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_shared_memory(names[0] + "_data", 64)
        inputs[1].set_shared_memory(names[1] + "_data", 64)
        outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
        outputs[0].set_shared_memory(names[2] + "_data", 64)
        outputs[1].set_shared_memory(names[3] + "_data", 64)
        client.infer("onnx_int32_int32_int32", inputs, outputs=outputs, model_version="1")
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handles[2], np.int32, [1, 16]), a + b)
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handles[3], np.int32, [1, 16]), a - b)
    finally:
        client.unregister_system_shared_memory()
        for h in handles:
            shm.destroy_shared_memory_region(h)


@pytest.mark.parametrize("kind", ["simple", "sequence", "fan"])
@pytest.mark.parametrize("batch", [True, False])
def test_ensembles_answer_as_their_addsub_model_with_its_labels(urls, kind, batch):
    name = f"{kind}_onnx{'' if batch else '_nobatch'}_int8_int8_int8"
    shape = (2, 16) if batch else (16,)
    a, b = _int8_pair(shape)
    client = grpcclient.InferenceServerClient(urls["grpc"])
    raw = client.infer(name, _inputs(grpcclient, a, b, "INT8"))
    np.testing.assert_array_equal(raw.as_numpy("OUTPUT0"), a - b)  # the addsub model's latest version (swapped)
    np.testing.assert_array_equal(raw.as_numpy("OUTPUT1"), a + b)
    classes = client.infer(name, _inputs(grpcclient, a, b, "INT8"),
                           outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)]).as_numpy("OUTPUT0")
    assert classes.shape == ((2, 3) if batch else (3,))
    expected = (a - b).reshape(-1, 16)
    for row, entries in zip(expected, classes.reshape(-1, 3)):
        for entry in entries:
            value, index, label = entry.decode().split(":")  # simple_/sequence_ have no label file of their own
            assert float(value) == row[int(index)] and label == f"label{index}"


def test_non_batching_ensemble_passes_tensors_that_carry_the_batch_dim_as_they_are(urls):
    a, b = _int8_pair((3, 16))
    inputs = [httpclient.InferInput("A", [3, 16], "INT8"), httpclient.InferInput("B", [3, 16], "INT8")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = httpclient.InferenceServerClient(urls["http"]).infer("full_shape_nobatch", inputs)
    np.testing.assert_array_equal(result.as_numpy("DIFF"), a - b)
