"""loadtests/h2_probe.py, the measurement probe behind "gRPC cost, round 3": it must answer the real
tritonclient.grpc.aio client exactly as the grpcio servicer does for ModelInfer (same rows, same status codes),
or the CPU it was measured at prices a different job."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as syncclient
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from loadtests.cpu_per_request import _servers
from loadtests.h2_probe import start_probe
from loadtests.serverproc import serve
from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config


@pytest.fixture(scope="module")
async def probe_url(tmp_path_factory) -> str:
    root: Path = tmp_path_factory.mktemp("h2probe") / "models"
    scale_model(root / "scale" / "1" / "model.onnx", factor=3.0)
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    port = free_port()
    async with inprocess_server(root) as (server, _):
        probe = await start_probe(server.core, host="127.0.0.1", port=port)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await probe.stop(None)


@pytest.fixture
async def client(probe_url):
    c = grpcclient.InferenceServerClient(probe_url)
    yield c
    await c.close()


def _input(data: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp


async def test_model_infer_answers_many_concurrent_calls_on_one_connection(client):
    xs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(40)]
    results = await asyncio.gather(*(client.infer("scale", [_input(x)], request_id=f"r{i}") for i, x in enumerate(xs)))
    for i, (x, result) in enumerate(zip(xs, results, strict=True)):
        np.testing.assert_array_equal(result.as_numpy("y"), x * 3.0)
        assert result.get_response().id == f"r{i}"


async def test_serving_errors_keep_their_grpc_status(client):
    with pytest.raises(InferenceServerException) as err:
        await client.infer("nope", [_input(np.zeros((1, 4), np.float32))])
    assert err.value.status() == "StatusCode.NOT_FOUND" and "nope" in err.value.message()
    bad = grpcclient.InferInput("x", [1, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException) as err:
        await client.infer("scale", [bad])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


async def test_other_methods_are_unimplemented(client):
    with pytest.raises(InferenceServerException) as err:
        await client.get_server_metadata()
    assert err.value.status() == "StatusCode.UNIMPLEMENTED"


def test_cpu_per_request_runs_the_probe_as_a_server_process(tmp_path):
    """`cpu_per_request --h2-probe` starts `python -m loadtests.h2_probe serve ...`: the real process answers
    gRPC ModelInfer through the probe while HTTP is the server's own."""
    args = argparse.Namespace(compare=None, variant=["exp=GRPC_EXPERIMENTS=a,b;X=1"], h2_probe=True)
    specs = _servers(args, argparse.ArgumentParser())
    assert specs["exp"][1] == {"GRPC_EXPERIMENTS": "a,b", "X": "1"} and specs["h2-probe"][2] == "loadtests.h2_probe"
    with pytest.raises(SystemExit):
        _servers(argparse.Namespace(compare=None, variant=["no-assignment"], h2_probe=False), argparse.ArgumentParser())
    repo = tmp_path / "models"
    scale_model(repo / "scale" / "1" / "model.onnx", factor=3.0)
    write_config(repo / "scale", "max_batch_size: 8\n")
    with serve(repo, log_path=tmp_path / "server.log", grpc=True, module=specs["h2-probe"][2]) as server:
        client = syncclient.InferenceServerClient(server.grpc_url)
        x = np.ones((2, 4), np.float32)
        inp = syncclient.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("scale", [inp]).as_numpy("y"), x * 3.0)
        with pytest.raises(InferenceServerException) as err:
            client.get_server_metadata()
        assert err.value.status() == "StatusCode.UNIMPLEMENTED"  # the probe, not grpcio's servicer, answered
        client.close()
