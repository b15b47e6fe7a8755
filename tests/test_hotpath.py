"""The per-request fast paths keep their answers right: remembered binary headers (service/v2_plans.py),
layouts validated once (ModelVersion.validate), one write per HTTP response (http_server.CorkableTransport)
and gRPC responses built from templates (protocol_grpc.encode_infer_wire)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import orjson
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, two_io_model, write_config

HEADER = orjson.dumps({
    "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
    "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
})


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hotpath") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    two_io_model(root / "two_io" / "1" / "model.onnx")
    write_config(root / "two_io", "max_batch_size: 8\n")
    return root


def _binary_output(body: bytes, header_length: int) -> tuple[dict, np.ndarray]:
    doc = orjson.loads(body[:header_length])
    (out,) = doc["outputs"]
    return doc, np.frombuffer(body[header_length:], dtype=np.float32).reshape(out["shape"])


async def test_a_repeated_header_reads_each_requests_own_data(repo):
    async with inprocess_server(repo) as (_, client):
        for seed in range(3):  # the same header bytes each time; only the tail differs
            x = np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)
            resp = await client.post("/v2/models/scale/infer", content=HEADER + x.tobytes(),
                                     headers={"Inference-Header-Content-Length": str(len(HEADER))})
            assert resp.status_code == 200, resp.text
            hlen = int(resp.headers["inference-header-content-length"])
            doc, y = _binary_output(resp.content, hlen)
            assert doc["outputs"][0]["parameters"]["binary_data_size"] == 32
            np.testing.assert_array_equal(y, x * 2)
        short = await client.post("/v2/models/scale/infer", content=HEADER + b"\0" * 24,
                                  headers={"Inference-Header-Content-Length": str(len(HEADER))})
        assert short.status_code == 400 and "does not fit" in short.json()["error"]
        # The same header against a model whose input it does not fit: the model's own checks still run.
        other = await client.post("/v2/models/two_io/infer", content=HEADER + b"\0" * 32,
                                  headers={"Inference-Header-Content-Length": str(len(HEADER))})
        assert other.status_code == 400 and "unexpected input(s) ['x']" in other.json()["error"]


async def test_a_layout_seen_once_is_still_checked_for_datatype_and_shape(repo):
    async with inprocess_server(repo) as (_, client):
        def body(arr: np.ndarray, datatype: str) -> dict:
            return {"inputs": [{"name": "x", "shape": list(arr.shape), "datatype": datatype,
                                "data": arr.reshape(-1).tolist()}]}

        ok = await client.post("/v2/models/scale/infer", json=body(np.ones((1, 4)), "FP32"))
        assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [2.0] * 4
        wrong_type = await client.post("/v2/models/scale/infer", json=body(np.ones((1, 4)), "FP64"))
        assert wrong_type.status_code == 400 and "expected datatype FP32, got FP64" in wrong_type.json()["error"]
        wrong_shape = await client.post("/v2/models/scale/infer", json=body(np.ones((1, 5)), "FP32"))
        assert wrong_shape.status_code == 400 and "expected shape [-1, 4], got [1, 5]" in wrong_shape.json()["error"]
        again = await client.post("/v2/models/scale/infer", json=body(np.ones((1, 4)), "FP32"))
        assert again.status_code == 200


def _read_response(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes, bytes]:
    """(head, body, what follows) of one HTTP/1.1 response with a content-length, read from `sock`."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside the headers: {buffer!r}"
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    return head, rest[:length], rest[length:]


def test_keep_alive_and_connection_close_answers_arrive_whole(repo):
    """Each answer's status line, headers and body are written together; with `Connection: close` the held
    bytes go out before the connection closes."""
    with run_server(repo) as url:
        host, port = url.split(":")
        x = np.arange(8, dtype=np.float32).reshape(2, 4)

        def request(close: bool) -> bytes:
            return (b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
                    + (b"Connection: close\r\n" if close else b"")
                    + b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                    % (len(HEADER), len(HEADER) + x.nbytes) + HEADER + x.tobytes())

        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(request(False) + request(True))  # pipelined: two answers on one connection
            left = b""
            for _ in range(2):
                head, body, left = _read_response(sock, left)
                assert head.startswith(b"HTTP/1.1 200"), head
                hlen = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                            if line.lower().startswith(b"inference-header-content-length:"))
                _, y = _binary_output(body, hlen)
                np.testing.assert_array_equal(y, x * 2)
            assert b"connection: close" in head.lower()
            assert left == b"" and sock.recv(1) == b""  # then the server closed the connection


@pytest.fixture(scope="module")
async def grpc_url(repo) -> str:
    port = free_port()
    async with inprocess_server(repo, grpc_port=port):
        yield f"127.0.0.1:{port}"


async def test_grpc_answers_carry_id_outputs_and_raw_contents(grpc_url):
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        b = np.ones((2, 3), dtype=np.float32)
        inputs = []
        for name, arr in (("a", a), ("b", b)):
            inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        for request_id in ("", "req-7", "x" * 300):  # ids longer than one varint byte too
            result = await client.infer("two_io", inputs, request_id=request_id)
            response = result.get_response()
            assert response.id == request_id and response.model_name == "two_io"
            assert [o.name for o in response.outputs] == ["sum", "idx"]
            np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
            np.testing.assert_array_equal(result.as_numpy("idx"), [[2], [2]])
        only = await client.infer("two_io", inputs, outputs=[grpcclient.InferRequestedOutput("idx")])
        assert [o.name for o in only.get_response().outputs] == ["idx"] and only.as_numpy("sum") is None
        with pytest.raises(InferenceServerException, match="expected datatype FP32"):
            bad = grpcclient.InferInput("a", [2, 3], "INT32")
            bad.set_data_from_numpy(np.zeros((2, 3), np.int32))
            await client.infer("two_io", [bad, inputs[1]])
    finally:
        await client.close()
