"""The real server (uvicorn on a loopback port) driven by the real tritonclient.http, JSON and binary."""

from __future__ import annotations

import concurrent.futures as cf
import socket
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server, wait_until
from tests.onnx_builders import (
    gather_model,
    not_model,
    scale_model,
    slow_model,
    string_model,
    two_io_model,
    write_config,
)

SLOW_NOBATCH = 'max_batch_size: 4\ninstance_group [{ count: 1 kind: KIND_CPU }]\n'
# Triton's fixed delay, pinned: the batching tests below count on requests sent one after another (tritonclient's
# async_infer) waiting for each other, which adaptive batching (the default) does not do for a sequential client.
TRITON_DELAY = 'parameters { key: "adaptive_batching" value: { string_value: "false" } }\n'


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")  # no config.pbtxt: everything inferred
    scale_model(root / "batched" / "1" / "model.onnx")
    write_config(root / "batched", 'max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 200000 '
                 'preferred_batch_size: [ 16 ] }\ninstance_group [{ count: 1 kind: KIND_CPU }]\n' + TRITON_DELAY)
    two_io_model(root / "two_io" / "1" / "model.onnx")
    write_config(root / "two_io", 'max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 200000 }\n'
                 + TRITON_DELAY +
                 'input [{ name: "a" data_type: TYPE_FP32 dims: [ -1 ] }, { name: "b" data_type: TYPE_FP32 dims: [ -1 ] }]\n'
                 'output [{ name: "sum" data_type: TYPE_FP32 dims: [ -1 ] label_filename: "labels.txt" },'
                 ' { name: "idx" data_type: TYPE_INT64 dims: [ 1 ] }]\n')
    (root / "two_io" / "labels.txt").write_text("zero\none\ntwo\n")
    string_model(root / "strings" / "1" / "model.onnx")
    not_model(root / "flags" / "1" / "model.onnx")
    scale_model(root / "half" / "1" / "model.onnx", dtype=10)  # TensorProto.FLOAT16
    gather_model(root / "lookup" / "1" / "model.onnx")
    write_config(root / "lookup", 'max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 300000 '
                 'preferred_batch_size: [ 3 ] }\n')
    slow_model(root / "slow_queue" / "1" / "model.onnx")
    write_config(root / "slow_queue", 'max_batch_size: 1\ndynamic_batching { default_queue_policy '
                 '{ max_queue_size: 1 } }\ninstance_group [{ count: 1 kind: KIND_CPU }]\n')
    # Slower still: the tests below must not depend on how fast a loaded machine runs the test's own client.
    slow_model(root / "slow_timeout" / "1" / "model.onnx", repeats=300)
    write_config(root / "slow_timeout", 'max_batch_size: 1\ndynamic_batching { default_queue_policy { '
                 'default_timeout_microseconds: 20000000 allow_timeout_override: true } }\n'
                 'instance_group [{ count: 1 kind: KIND_CPU }]\n')
    slow_model(root / "slow_plain" / "1" / "model.onnx", repeats=300)
    write_config(root / "slow_plain", SLOW_NOBATCH)
    for v, factor in ((1, 1.0), (2, 2.0), (3, 3.0)):
        scale_model(root / "versioned" / str(v) / "model.onnx", factor=factor)
    write_config(root / "versioned", "version_policy: { specific: { versions: [1, 2] } }\n")
    broken = root / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    return root


@pytest.fixture(scope="module")
def url(repo) -> str:
    # Warm-up is off: it would run the slow models for seconds and is not what these tests are about.
    with run_server(repo, env={"MODELSERVE_MAX_REQUEST_BYTES": str(1 << 20), "MODELSERVE_WARMUP": "false"}) as u:
        yield u


@pytest.fixture
def client(url):
    c = httpclient.InferenceServerClient(url, concurrency=32, network_timeout=120)
    yield c
    c.close()


def _input(name: str, data: np.ndarray, datatype: str, *, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data, binary_data=binary)
    return inp


def _stats(client, model: str) -> dict:
    return client.get_inference_statistics(model)["model_stats"][0]


def test_health_metadata_and_config(client):
    # Strict readiness (the default): the repository's "broken" model failed to load, so not ready.
    assert client.is_server_live() and not client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "modelserve" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("scale")
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    config = client.get_model_config("scale")
    assert config["max_batch_size"] == 32 and "dynamic_batching" in config
    assert client.get_model_config("batched")["dynamic_batching"]["max_queue_delay_microseconds"] == 200000
    assert client.is_model_ready("scale") and client.is_model_ready("versioned", "2")


@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_infer_json_and_binary(client, binary_in, binary_out):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = httpclient.InferRequestedOutput("y", binary_data=binary_out)
    result = client.infer("scale", [_input("x", x, "FP32", binary=binary_in)], outputs=[out])
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    assert result.get_response()["model_name"] == "scale"


def test_nested_json_data_and_output_selection(url):
    body = {"inputs": [{"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [[1, 5, 2], [7, 0, 1]]},
                       {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": [1, 1, 1, 1, 1, 1]}],
            "outputs": [{"name": "idx"}]}
    resp = httpx.post(f"http://{url}/v2/models/two_io/infer", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    outputs = resp.json()["outputs"]
    assert [o["name"] for o in outputs] == ["idx"]
    assert outputs[0]["data"] == [1, 0] and outputs[0]["datatype"] == "INT64"


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_fp16_and_bool(client, binary):
    s = np.array([[b"hello"], [b""], ["naïve".encode()]], dtype=object)
    got = client.infer("strings", [_input("x", s, "BYTES", binary=binary)],
                       outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)]).as_numpy("y")
    # tritonclient gives str for JSON BYTES and bytes for binary ones, as with Triton.
    assert [v if isinstance(v, bytes) else v.encode() for v in got.reshape(-1)] == [b"hello", b"", "naïve".encode()]
    h = np.array([[0.5, 1.5, -2.0, 3.25]], dtype=np.float16)
    got = client.infer("half", [_input("x", h, "FP16", binary=True)],
                       outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)]).as_numpy("y")
    np.testing.assert_array_equal(got.astype(np.float16), h * 2)
    b = np.array([[True, False], [False, False]])
    got = client.infer("flags", [_input("x", b, "BOOL", binary=binary)],
                       outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)]).as_numpy("y")
    np.testing.assert_array_equal(got, ~b)


def test_classification_extension_uses_labels(client):
    a = np.array([[0.1, 0.9, 0.3]], dtype=np.float32)
    result = client.infer("two_io", [_input("a", a, "FP32", binary=True), _input("b", np.zeros_like(a), "FP32", binary=True)],
                          outputs=[httpclient.InferRequestedOutput("sum", class_count=2)])
    top = [v.decode() for v in result.as_numpy("sum").reshape(-1)]
    assert top[0].endswith(":1:one") and top[1].endswith(":2:two")


def test_concurrent_requests_are_batched(client):
    before = _stats(client, "batched")
    xs = [np.full((1, 4), i, dtype=np.float32) for i in range(16)]
    pending = [client.async_infer("batched", [_input("x", x, "FP32", binary=True)]) for x in xs]
    for x, p in zip(xs, pending):
        np.testing.assert_array_equal(p.get_result().as_numpy("y"), x * 2)
    after = _stats(client, "batched")
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 16
    assert executions < inferences, f"no batching: {executions} executions for {inferences} rows"


def test_rows_count_and_different_shapes_are_not_stacked(client):
    """Multi-row requests count as rows; requests of other non-batch dims run in their own batch."""
    before = _stats(client, "two_io")
    shapes = [(2, 3), (1, 5), (3, 3), (1, 5)]
    arrays = [np.random.default_rng(i).random(s, dtype=np.float32) for i, s in enumerate(shapes)]
    pending = [client.async_infer("two_io", [_input("a", a, "FP32", binary=True), _input("b", a, "FP32", binary=False)])
               for a in arrays]
    for a, p in zip(arrays, pending):
        np.testing.assert_allclose(p.get_result().as_numpy("sum"), a * 2, rtol=1e-6)
    after = _stats(client, "two_io")
    assert after["inference_count"] - before["inference_count"] == 7
    sizes = {b["batch_size"] for b in after["batch_stats"]}
    assert 5 in sizes and 2 in sizes, f"expected a 5-row [L=3] batch and a 2-row [L=5] batch, got {sizes}"


def test_bad_input_is_400_with_expected_shape(client):
    bad = np.zeros((3, 5), dtype=np.float32)
    with pytest.raises(InferenceServerException) as err:
        client.infer("scale", [_input("x", bad, "FP32", binary=True)])
    assert err.value.status() == "400"
    assert "expected shape [-1, 4], got [3, 5]" in err.value.message()
    with pytest.raises(InferenceServerException, match="expected datatype FP32, got INT32"):
        client.infer("scale", [_input("x", np.zeros((1, 4), np.int32), "INT32", binary=True)])


def test_malformed_bodies_get_clear_400s(url):
    cases = [
        (b"{not json", "not valid JSON"),
        (b'{"inputs": []}', "expected 1 inputs but got 0 inputs"),
        (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2]}]}', "needs 4 elements"),
        (b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FLOAT", "data": [1, 2, 3, 4]}]}', "unknown datatype"),
    ]
    for body, message in cases:
        resp = httpx.post(f"http://{url}/v2/models/scale/infer", content=body, timeout=30)
        assert resp.status_code == 400 and message in resp.json()["error"], resp.text
    header = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}'
    resp = httpx.post(f"http://{url}/v2/models/scale/infer", content=header + b"\0" * 8,
                      headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert resp.status_code == 400 and "does not fit" in resp.json()["error"]


def test_unknown_model_and_version_are_404(client, url):
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [_input("x", np.zeros((1, 4), np.float32), "FP32", binary=False)])
    assert err.value.status() == "404" and "Request for unknown model: 'nope' is not found" in err.value.message()
    resp = httpx.get(f"http://{url}/v2/models/versioned/versions/3", timeout=30)
    assert resp.status_code == 404 and "version 3 is not found; loaded versions are ['1', '2']" in resp.json()["error"]


def test_version_policy_and_versioned_infer(client):
    x = np.ones((1, 4), dtype=np.float32)
    assert client.get_model_metadata("versioned")["versions"] == ["1", "2"]
    v1 = client.infer("versioned", [_input("x", x, "FP32", binary=True)], model_version="1").as_numpy("y")
    latest = client.infer("versioned", [_input("x", x, "FP32", binary=True)]).as_numpy("y")
    np.testing.assert_array_equal(v1, x)
    np.testing.assert_array_equal(latest, x * 2)


def test_broken_model_is_unavailable_and_others_serve(client):
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index["broken"]["state"] == "UNAVAILABLE" and "could not load" in index["broken"]["reason"]
    assert index["scale"]["state"] == "READY"
    assert not client.is_model_ready("broken")
    with pytest.raises(InferenceServerException) as err:
        client.infer("broken", [_input("x", np.zeros((1, 4), np.float32), "FP32", binary=False)])
    assert err.value.status() == "503"


def test_one_failing_request_does_not_fail_its_batch_mates(client):
    good = [np.array([[i]], dtype=np.int64) for i in (1, 2)]
    bad = np.array([[99]], dtype=np.int64)
    pending = [client.async_infer("lookup", [_input("idx", x, "INT64", binary=True)]) for x in (good[0], bad, good[1])]
    np.testing.assert_array_equal(pending[0].get_result().as_numpy("y"), [[[2.0, 3.0]]])
    np.testing.assert_array_equal(pending[2].get_result().as_numpy("y"), [[[4.0, 5.0]]])
    with pytest.raises(InferenceServerException) as err:
        pending[1].get_result()
    assert err.value.status() == "400" and "out of the model's range" in err.value.message()


def _post_slow(url: str, model: str, *, timeout_us: int | None = None) -> httpx.Response:
    body: dict = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    if timeout_us is not None:
        body["parameters"] = {"timeout": timeout_us}
    return httpx.post(f"http://{url}/v2/models/{model}/infer", json=body, timeout=120)


def test_full_queue_is_503_with_retry_after(url):
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post_slow(url, "slow_queue"), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1" and "queue is full" in rejected.json()["error"]


def test_request_timing_out_in_queue_is_never_run(client, url):
    before = _stats(client, "slow_timeout")
    with cf.ThreadPoolExecutor(4) as pool:
        blockers = [pool.submit(_post_slow, url, "slow_timeout") for _ in range(3)]
        # While a blocker still waits, another executes: the late request queues behind them with a 1 ms timeout.
        wait_until(lambda: _pending(url, "slow_timeout") >= 1, what="a queued blocker")
        late = pool.submit(_post_slow, url, "slow_timeout", timeout_us=1000)
        timed_out = late.result()
        assert [b.result().status_code for b in blockers] == [200, 200, 200]
    assert timed_out.status_code == 503 and "timed out in the queue" in timed_out.json()["error"], timed_out.text
    after = _stats(client, "slow_timeout")
    assert after["execution_count"] - before["execution_count"] == 3
    assert after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 1


def _raw_request(url: str, body: bytes) -> socket.socket:
    host, port = url.split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v2/models/slow_plain/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_disconnected_callers_are_dropped_before_compute(client, url):
    before = _stats(client, "slow_plain")
    body = b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}'
    socks = [_raw_request(url, body) for _ in range(4)]
    # One executes, the others wait in the queue; then every caller hangs up.
    wait_until(lambda: _pending(url, "slow_plain") >= 2, what="two queued requests")
    for s in socks:
        s.close()

    def settled() -> bool:
        s = _stats(client, "slow_plain")
        ended = s["inference_stats"]["success"]["count"] + s["inference_stats"]["fail"]["count"]
        return ended - before["inference_stats"]["success"]["count"] - before["inference_stats"]["fail"]["count"] == 4
    wait_until(settled, what="all four requests to end")
    after = _stats(client, "slow_plain")
    executed = after["execution_count"] - before["execution_count"]
    # At most the running one and one that started before the hang-ups reached the server; the rest never ran.
    assert executed <= 2, f"{executed} of 4 disconnected requests were run"
    cancelled = _metric(url, 'nv_inference_request_failure{model="slow_plain",reason="CANCELED",version="1"}')
    assert cancelled == 4 - executed, (cancelled, executed)


def _pending(url: str, model: str) -> float:
    return _metric(url, f'nv_inference_pending_request_count{{model="{model}",version="1"}}')


def _metric(url: str, series: str) -> float:
    for line in httpx.get(f"http://{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_counters_move(client, url):
    series = 'nv_inference_request_success{model="scale",version="1"}'
    fail = 'nv_inference_request_failure{model="scale",reason="REJECTED",version="1"}'
    s0, f0 = _metric(url, series), _metric(url, fail)
    client.infer("scale", [_input("x", np.ones((2, 4), np.float32), "FP32", binary=True)])
    with pytest.raises(InferenceServerException):
        client.infer("scale", [_input("x", np.ones((2, 3), np.float32), "FP32", binary=True)])
    assert _metric(url, series) == s0 + 1
    assert _metric(url, fail) == f0 + 1
    text = httpx.get(f"http://{url}/metrics", timeout=30).text
    for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us", "modelserve_batch_size_bucket",
                 "modelserve_request_latency_seconds_bucket"):
        assert f"\n{name}{{" in text, name


def test_gzip_request_bodies(url):
    import gzip

    body = gzip.compress(b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}')
    resp = httpx.post(f"http://{url}/v2/models/scale/infer", content=body, headers={"Content-Encoding": "gzip"},
                      timeout=30)
    assert resp.status_code == 200 and resp.json()["outputs"][0]["data"] == [2, 4, 6, 8]
    resp = httpx.post(f"http://{url}/v2/models/scale/infer", content=body, headers={"Content-Encoding": "br"},
                      timeout=30)
    assert resp.status_code == 415 and "use gzip, deflate or identity" in resp.json()["error"]
    bomb = gzip.compress(b" " * (2 << 20))  # 2 MiB of spaces, far under the limit compressed
    resp = httpx.post(f"http://{url}/v2/models/scale/infer", content=bomb, headers={"Content-Encoding": "gzip"},
                      timeout=30)
    assert resp.status_code == 413 and "decompressed request body exceeds" in resp.json()["error"]


def test_openapi_documents_every_v2_route(url):
    paths = httpx.get(f"http://{url}/openapi.json", timeout=30).json()["paths"]
    for path in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer",
                 "/v2/health/ready", "/v2/repository/index", "/v2/models/stats", "/metrics"):
        assert path in paths, path
    assert httpx.get(f"http://{url}/docs", timeout=30).status_code == 200


def test_body_too_large_is_413(url):
    body = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [' + b"1," * 600_000 + b"1]}]}"
    resp = httpx.post(f"http://{url}/v2/models/scale/infer", content=body, timeout=30)
    assert resp.status_code == 413 and "exceeds the limit" in resp.json()["error"]


def test_explicit_mode_load_and_unload(tmp_path):
    root = tmp_path / "models"
    scale_model(root / "a" / "1" / "model.onnx")
    scale_model(root / "b" / "1" / "model.onnx")
    metrics_port = free_port()
    args = ["--model-control-mode", "explicit", "--load-model", "a", "--metrics-port", str(metrics_port)]
    with run_server(root, extra_args=args) as url:
        c = httpclient.InferenceServerClient(url)
        assert c.is_model_ready("a") and not c.is_model_ready("b")
        c.load_model("b")
        assert c.is_model_ready("b")
        c.unload_model("a")
        assert not c.is_model_ready("a")
        states = {r["name"]: r["state"] for r in c.get_model_repository_index()}
        assert states == {"a": "UNAVAILABLE", "b": "READY"}
        with pytest.raises(InferenceServerException, match="no model 'zzz'"):
            c.load_model("zzz")
        c.infer("b", [_input("x", np.ones((1, 4), np.float32), "FP32", binary=True)])
        separate = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        assert 'nv_inference_request_success{model="b",version="1"} 1.0' in separate
