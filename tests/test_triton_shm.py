"""System shared memory extension with the real tritonclient (HTTP and gRPC) and tritonclient.utils.shared_memory
against a real server subprocess: register / status / unregister, inputs read from and outputs written into
regions, bounds checks, and CUDA shared memory refused with a clear message."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server
from tests.inprocess import inprocess_server
from tests.onnx_builders import two_io_model

PROTOCOLS = ["http", "grpc"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shm") / "models"
    two_io_model(root / "two_io" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def urls(repo):
    grpc_port = free_port()
    with run_server(repo, extra_args=["--allow-client-shm", "true", "--grpc-port", str(grpc_port)]) as http_url:
        yield {"http": http_url, "grpc": f"127.0.0.1:{grpc_port}"}


@pytest.fixture(params=PROTOCOLS)
def client(request, urls):
    module = httpclient if request.param == "http" else grpcclient
    c = module.InferenceServerClient(urls[request.param])
    c.unregister_system_shared_memory()
    yield request.param, module, c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def regions():
    """Factory of /dev/shm regions (unique keys), destroyed after the test."""
    made = []

    def make(size: int):
        key = f"/ms_test_{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _count(protocol: str, status) -> int:
    return len(status) if protocol == "http" else len(status.regions)


def test_register_status_unregister_and_unregister_all(client, regions):
    protocol, _, c = client
    k1, _ = regions(64)
    k2, _ = regions(64)
    c.register_system_shared_memory("r1", k1, 64)
    c.register_system_shared_memory("r2", k2, 32, offset=16)
    assert _count(protocol, c.get_system_shared_memory_status()) == 2
    one = c.get_system_shared_memory_status("r2")
    if protocol == "http":
        assert one == [{"name": "r2", "key": k2, "offset": 16, "byte_size": 32}]
    else:
        assert one.regions["r2"].key == k2 and one.regions["r2"].offset == 16 and one.regions["r2"].byte_size == 32
    with pytest.raises(InferenceServerException, match="shared memory region 'r1' already in manager"):
        c.register_system_shared_memory("r1", k1, 64)
    c.unregister_system_shared_memory("r1")
    c.unregister_system_shared_memory("never-registered")  # a no-op, as in Triton
    assert _count(protocol, c.get_system_shared_memory_status()) == 1
    c.unregister_system_shared_memory()
    assert _count(protocol, c.get_system_shared_memory_status()) == 0


def test_register_refuses_out_of_bounds_and_non_shm_keys(client, regions):
    _, _, c = client
    key, _ = regions(64)
    for size, offset in ((65, 0), (64, 1), (1, 64), (0, 0)):
        with pytest.raises(InferenceServerException, match=r"failed to register shared memory region.*invalid args"):
            c.register_system_shared_memory("bad", key, size, offset=offset)
    for bad_key in ("/../etc/passwd", "a/b", "/"):
        with pytest.raises(InferenceServerException, match=r"invalid args|Unable to open"):
            c.register_system_shared_memory("bad", bad_key, 8)
    with pytest.raises(InferenceServerException, match="Unable to open shared memory region"):
        c.register_system_shared_memory("bad", "/ms_test_does_not_exist", 8)


def _infer(module, c, *, a_ref=None, b_raw=None, out_refs=()):
    a = module.InferInput("a", [2, 4], "FP32")
    b = module.InferInput("b", [2, 4], "FP32")
    a.set_shared_memory(*a_ref)
    if b_raw is not None:
        b.set_data_from_numpy(b_raw)
    else:
        b.set_shared_memory("in_b", 32)
    outputs = []
    for name, region, size, offset in out_refs:
        o = module.InferRequestedOutput(name)
        if region:
            o.set_shared_memory(region, size, offset=offset)
        outputs.append(o)
    return c.infer("two_io", [a, b], outputs=outputs or None)


def test_inputs_from_and_outputs_into_shared_memory(client, regions):
    protocol, module, c = client
    a_data = np.arange(8, dtype=np.float32).reshape(2, 4)
    b_data = np.full((2, 4), 0.5, dtype=np.float32)
    (ka, ha), (kb, hb), (ko, ho) = regions(32), regions(32), regions(64)
    shm.set_shared_memory_region(ha, [a_data])
    shm.set_shared_memory_region(hb, [b_data])
    for name, key, size in (("in_a", ka, 32), ("in_b", kb, 32), ("out", ko, 64)):
        c.register_system_shared_memory(name, key, size)
    result = _infer(module, c, a_ref=("in_a", 32), out_refs=[("sum", "out", 32, 0), ("idx", "out", 16, 32)])
    total = shm.get_contents_as_numpy(ho, np.float32, [2, 4])
    np.testing.assert_allclose(total, a_data + b_data)
    idx = np.frombuffer(shm.get_contents_as_numpy(ho, np.uint8, [64])[32:48].tobytes(), dtype=np.int64)
    assert idx.tolist() == [3, 3]
    out = result.get_output("sum")
    if protocol == "http":
        assert "data" not in out and "parameters" not in out  # as Triton (tests/test_triton_compat_round5.py)
        assert out["shape"] == [2, 4] and out["datatype"] == "FP32"
    else:
        assert out.parameters["shared_memory_region"].string_param == "out" and list(out.shape) == [2, 4]


def test_mixed_raw_and_shared_memory_tensors(client, regions):
    _, module, c = client
    a_data = np.arange(8, dtype=np.float32).reshape(2, 4)
    b_data = np.ones((2, 4), dtype=np.float32)
    (ka, ha), (ko, ho) = regions(32), regions(32)
    shm.set_shared_memory_region(ha, [a_data])
    c.register_system_shared_memory("in_a", ka, 32)
    c.register_system_shared_memory("out", ko, 32)
    result = _infer(module, c, a_ref=("in_a", 32), b_raw=b_data,
                    out_refs=[("sum", "out", 32, 0), ("idx", None, 0, 0)])
    np.testing.assert_allclose(shm.get_contents_as_numpy(ho, np.float32, [2, 4]), a_data + b_data)
    assert result.as_numpy("idx").reshape(-1).tolist() == [3, 3]


def test_bad_references_are_client_errors(client, regions):
    _, module, c = client
    (ka, _), (ko, _) = regions(64), regions(64)
    c.register_system_shared_memory("in_a", ka, 64)
    c.register_system_shared_memory("in_b", ka, 32)
    c.register_system_shared_memory("out", ko, 64)
    b = np.ones((2, 4), np.float32)
    cases = [
        (dict(a_ref=("in_a", 64)), "unexpected total byte size 64 for input 'a', expecting 32"),
        (dict(a_ref=("missing", 32)), "Unable to find shared memory region: 'missing'"),
        (dict(a_ref=("in_a", 32, 64)), "Invalid offset for shared memory region"),
        (dict(a_ref=("in_a", 32, 48)), "exceeds its 64 bytes"),
        (dict(a_ref=("in_a", 32), out_refs=[("sum", "out", 64, 64)]), "Invalid offset for shared memory region"),
        (dict(a_ref=("in_a", 32), out_refs=[("sum", "out", 16, 0)]), "should be at least 32 bytes"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InferenceServerException, match=message) as info:
            _infer(module, c, b_raw=b, **kwargs)
        assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")


def test_cuda_shared_memory_is_refused_clearly(urls):
    http = httpclient.InferenceServerClient(urls["http"])
    with pytest.raises(InferenceServerException, match="CUDA shared memory is not supported on this server") as info:
        http.register_cuda_shared_memory("r", base64.b64encode(b"handle"), 0, 8)
    assert info.value.status() == "400"
    g = grpcclient.InferenceServerClient(urls["grpc"])
    with pytest.raises(InferenceServerException, match="CUDA shared memory is not supported on this server") as info:
        g.register_cuda_shared_memory("r", base64.b64encode(b"handle"), 0, 8)
    assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)  # Triton's answer without GPUs
    assert "system_shared_memory" in http.get_server_metadata()["extensions"]


async def test_registration_is_off_unless_the_server_allows_it(repo, regions):
    key, _ = regions(16)
    async with inprocess_server(repo, warmup=False) as (_, client):
        r = await client.post("/v2/systemsharedmemory/region/r/register", json={"key": key, "byte_size": 16})
        assert r.status_code == 400 and "--allow-client-shm" in r.json()["error"]
        assert (await client.get("/v2/systemsharedmemory/status")).json() == []


async def test_register_body_is_checked(repo, regions):
    key, _ = regions(16)
    async with inprocess_server(repo, warmup=False, allow_client_shm=True) as (_, client):
        for body in ({"byte_size": 16}, {"key": key, "byte_size": -1}, {"key": key, "byte_size": "16"}):
            r = await client.post("/v2/systemsharedmemory/region/r/register", json=body)
            assert r.status_code == 400 and "invalid args" in r.json()["error"], body
        r = await client.get("/v2/systemsharedmemory/region/nope/status")
        assert r.status_code == 400 and "'nope'" in r.json()["error"]
