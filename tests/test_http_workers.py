"""`modelserve serve --http-workers 2` (experimental): two front-end processes (HTTP and gRPC) before one model
process answer tritonclient like the single process does, and every process goes away on shutdown."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.core import InferRequest, InferResponse, OutputTensor, RequestedOutput
from service.frontend_codec import dump_reply, dump_request, load_reply, load_request
from tests.conftest import REPO_ROOT, free_port, wait_until
from tests.onnx_builders import scale_model, write_config


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    return root


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(v) for v in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _start(repo: Path, port: int, *, grpc_port: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo), "--http-port", str(port),
           "--http-address", "127.0.0.1", "--log-level", "warning", "--http-workers", "2",
           *([] if grpc_port is None else ["--grpc-port", str(grpc_port)])]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def ready(poller: httpx.Client) -> bool:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            return poller.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    with httpx.Client(timeout=1.0) as poller:  # one client for every poll (see run_server in conftest.py)
        wait_until(lambda: ready(poller), timeout=90, what="server with 2 front ends")
    return proc


def _infer(url: str, seed: int, *, binary: bool) -> None:
    client = httpclient.InferenceServerClient(url)
    x = np.random.default_rng(seed).standard_normal((1 + seed % 3, 4)).astype(np.float32)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("scale", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)])
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    client.close()


def _grpc_infer(url: str, seed: int) -> None:
    client = grpcclient.InferenceServerClient(url)
    x = np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("scale", [inp]).as_numpy("y"), x * 2)
    client.close()


def _forwarded_and_refused_requests(url: str) -> None:
    """What a front end does not decode itself is forwarded and answered as by one process; bad input is a 4xx."""
    x = np.arange(4, dtype=np.float32)
    raw = httpx.post(f"http://{url}/v2/models/scale/infer", content=x.tobytes(),
                     headers={"Inference-Header-Content-Length": "0"})  # Triton's raw binary body: forwarded
    assert raw.status_code == 200, raw.text
    hlen = int(raw.headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(raw.content[hlen:], np.float32), x * 2)
    broken = httpx.post(f"http://{url}/v2/models/scale/infer", content=b"{not json")
    assert broken.status_code == 400 and "error" in broken.json()
    unknown = httpx.post(f"http://{url}/v2/models/nope/infer",
                         json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


def _stream_through_front_end(client: grpcclient.InferenceServerClient) -> None:
    """ModelStreamInfer is forwarded to the model process: answers and errors come back on the stream."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    x = np.ones((1, 4), np.float32)
    good, bad = grpcclient.InferInput("x", [1, 4], "FP32"), grpcclient.InferInput("x", [1, 5], "FP32")
    good.set_data_from_numpy(x)
    bad.set_data_from_numpy(np.ones((1, 5), np.float32))
    client.async_stream_infer("scale", [good], request_id="a")
    client.async_stream_infer("scale", [bad], request_id="b")
    got = [answers.get(timeout=30), answers.get(timeout=30)]  # a refused request may be answered first
    client.stop_stream()
    (result,) = [r for r, e in got if e is None]
    np.testing.assert_array_equal(result.as_numpy("y"), x * 2)
    (error,) = [e for r, e in got if e is not None]
    assert "expected shape [-1, 4], got [1, 5]" in error.message()


def test_two_front_ends_answer_tritonclient_and_leave_no_process_behind(repo):
    port, grpc_port = free_port(), free_port()
    proc = _start(repo, port, grpc_port=grpc_port)
    url = f"127.0.0.1:{port}"
    try:
        fronts = _children(proc.pid)
        assert len(fronts) == 2 and all(_alive(p) for p in fronts), fronts
        with ThreadPoolExecutor(8) as pool:  # many connections: both front ends get some (SO_REUSEPORT)
            list(pool.map(lambda i: _infer(url, i, binary=i % 2 == 0), range(48)))
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_ready() and client.get_model_metadata("scale")["name"] == "scale"  # proxied
        bad = httpclient.InferInput("x", [1, 5], "FP32")
        bad.set_data_from_numpy(np.ones((1, 5), np.float32))
        with pytest.raises(InferenceServerException, match=r"expected shape \[-1, 4\], got \[1, 5\]"):
            client.infer("scale", [bad])
        with ThreadPoolExecutor(8) as pool:  # gRPC: the front ends serve the public port too
            list(pool.map(lambda i: _grpc_infer(f"127.0.0.1:{grpc_port}", i), range(16)))
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert g.is_server_ready() and g.get_model_metadata("scale").name == "scale"  # forwarded RPCs
        bad = grpcclient.InferInput("x", [1, 5], "FP32")
        bad.set_data_from_numpy(np.ones((1, 5), np.float32))
        with pytest.raises(InferenceServerException, match=r"expected shape \[-1, 4\], got \[1, 5\]") as err:
            g.infer("scale", [bad])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        _stream_through_front_end(g)
        g.close()
        _forwarded_and_refused_requests(url)
        stats = client.get_inference_statistics("scale")["model_stats"][0]["inference_stats"]
        assert stats["success"]["count"] >= 65  # run by the one model process, whichever front end took it
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 0
    assert not [p for p in fronts if _alive(p)], "front-end processes outlived the server"


def test_front_ends_die_with_a_killed_model_process(repo):
    proc = _start(repo, free_port())
    fronts = _children(proc.pid)
    assert len(fronts) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until(lambda: not any(_alive(p) for p in fronts), timeout=20, what="front ends to exit")


def test_a_front_end_that_dies_stops_the_server_with_an_error(repo):
    proc = _start(repo, free_port())
    fronts = _children(proc.pid)
    os.kill(fronts[0], signal.SIGKILL)
    rc = proc.wait(timeout=40)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert rc != 0 and f"front-end process {fronts[0]} exited on its own" in out, out
    assert not any(_alive(p) for p in fronts)


def test_link_bodies_round_trip_numeric_tensors_packed_and_the_rest_pickled():
    image = np.arange(784, dtype=np.float32).reshape(1, 1, 28, 28)
    req = InferRequest(model_name="cnn", model_version=None, inputs={"image": image, "k": np.array([[True]])},
                       outputs=[RequestedOutput("y", class_count=3)], parameters={"a": [1, "b"]}, id="r1")
    body = dump_request(req)
    assert body[:1] == b"T"  # the packed form: a JSON header and the raw bytes
    back = load_request(body)
    assert (back.model_name, back.model_version, back.id, back.parameters) == ("cnn", None, "r1", {"a": [1, "b"]})
    assert back.outputs == [RequestedOutput("y", class_count=3)]
    np.testing.assert_array_equal(back.inputs["image"], image)
    assert back.inputs["k"].dtype == np.bool_ and back.inputs["k"].shape == (1, 1)
    texts = InferRequest(model_name="t", model_version="2", inputs={"s": np.array([b"ab", b""], dtype=object)})
    assert dump_request(texts)[:1] == b"P" and list(load_request(dump_request(texts)).inputs["s"]) == [b"ab", b""]
    resp = InferResponse(model_name="cnn", model_version="1", outputs=[OutputTensor("y", np.ones((2, 0), np.int64))])
    out = load_reply(dump_reply(resp))
    assert isinstance(out, InferResponse) and out.outputs[0].data.shape == (2, 0)


def test_http_workers_out_of_range_is_refused_with_the_valid_range(repo):
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo),
                          "--http-workers", "0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "http_workers" in out.stderr and "greater than or equal to 1" in out.stderr
