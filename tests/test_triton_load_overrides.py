"""Triton's load API overrides with tritonclient's load_model(config=..., files=...), over HTTP and gRPC, against
a real server in explicit mode: the override config replaces config.pbtxt, override files load from a
temporary model folder (never written into the repository) that unload and reload remove."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server
from tests.inprocess import inprocess_server
from tests.triton_models import add_sub_onnx, build_triton_examples

OVERRIDE_CONFIG = json.dumps({
    "backend": "onnxruntime", "max_batch_size": 8,
    "input": [{"name": n, "data_type": "TYPE_INT32", "dims": [16]} for n in ("INPUT0", "INPUT1")],
    "output": [{"name": n, "data_type": "TYPE_INT32", "dims": [16]} for n in ("OUTPUT0", "OUTPUT1")],
})


def snapshot(root) -> list[tuple[str, int]]:
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("triton_overrides")
    repo = build_triton_examples(base / "repo")
    temp = base / "tmp"
    temp.mkdir()
    grpc_port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(grpc_port), "--model-control-mode", "explicit",
                                      "--load-model", "simple"], env={"TMPDIR": str(temp)}) as url:
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "repo": repo, "temp": temp}


def _infer(client, module, model: str) -> dict[str, np.ndarray]:
    a, b = np.arange(16, dtype=np.int32).reshape(1, 16), np.ones((1, 16), dtype=np.int32)
    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"), module.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(model, inputs)
    return {"sum": result.as_numpy("OUTPUT0"), "diff": result.as_numpy("OUTPUT1"), "a": a, "b": b}


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_load_with_config_and_files_serves_a_new_model_from_a_temp_folder(server, module):
    url = server["url"] if module is httpclient else server["grpc"]
    client = module.InferenceServerClient(url)
    name = f"uploaded_{module.__name__.split('.')[-1]}"
    before = snapshot(server["repo"])
    client.load_model(name, config=OVERRIDE_CONFIG, files={"file:1/model.onnx": add_sub_onnx()})
    assert client.is_model_ready(name)
    out = _infer(client, module, name)
    np.testing.assert_array_equal(out["sum"], out["a"] + out["b"])
    assert snapshot(server["repo"]) == before  # nothing written into the repository
    folders = [p for p in server["temp"].iterdir() if p.name.startswith("modelserve-override-")]
    assert any((p / name / "1" / "model.onnx").is_file() for p in folders)
    client.load_model(name, config=OVERRIDE_CONFIG, files={"file:1/model.onnx": add_sub_onnx()})  # replace
    assert len([p for p in server["temp"].iterdir() if (p / name).is_dir()]) == 1
    client.unload_model(name)
    assert not [p for p in server["temp"].iterdir() if (p / name).is_dir()]
    assert not client.is_model_ready(name)


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_config_override_replaces_config_pbtxt(server, module):
    client = module.InferenceServerClient(server["url"] if module is httpclient else server["grpc"])
    unbatched = json.loads(OVERRIDE_CONFIG) | {"max_batch_size": 0}
    for entry in unbatched["input"] + unbatched["output"]:
        entry["dims"] = [-1, 16]
    client.load_model("simple", config=json.dumps(unbatched))
    config = client.get_model_config("simple")
    max_batch_size = config["max_batch_size"] if module is httpclient else config.config.max_batch_size
    assert max_batch_size == 0
    client.load_model("simple")  # a plain load goes back to the repository's config.pbtxt
    config = client.get_model_config("simple")
    assert (config["max_batch_size"] if module is httpclient else config.config.max_batch_size) == 8


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_bad_overrides_are_400_and_change_nothing(server, module):
    client = module.InferenceServerClient(server["url"] if module is httpclient else server["grpc"])
    cases = [
        ({"config": "{not json"}, "failed to parse the model config override"),
        ({"config": json.dumps({"max_batch_size": "eight"})}, "failed to parse the model config override"),
        ({"files": {"file:1/model.onnx": add_sub_onnx()}}, "need the model config override 'config'"),
        ({"config": OVERRIDE_CONFIG, "files": {"file:../escape.onnx": b"x"}}, "must name a file inside a version"),
        ({"config": OVERRIDE_CONFIG, "files": {"file:model.onnx": b"x"}}, "must name a file inside a version"),
        ({"config": OVERRIDE_CONFIG, "files": {"file:1/model.onnx": b"not onnx"}}, "could not load"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("broken", **kwargs)
        assert message in err.value.message(), (kwargs, err.value.message())
        assert err.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    assert not (server["repo"] / "broken").exists() and not (server["repo"].parent / "escape.onnx").exists()
    assert not [p for p in server["temp"].iterdir() if (p / "broken").is_dir()]
    assert client.is_model_ready("simple")


def test_http_load_body_checks(server):
    url = f"http://{server['url']}/v2/repository/models/broken/load"
    bad_b64 = httpx.post(url, json={"parameters": {"config": OVERRIDE_CONFIG, "file:1/model.onnx": "@@@"}})
    not_object = httpx.post(url, json={"parameters": ["config"]})
    assert bad_b64.status_code == 400 and "base64" in bad_b64.json()["error"]
    assert not_object.status_code == 400 and "'parameters' must be a JSON object" in not_object.json()["error"]


async def test_load_body_over_the_request_limit_is_413_before_it_is_read(tmp_path):
    repo = build_triton_examples(tmp_path / "repo")
    body = json.dumps({"parameters": {"config": OVERRIDE_CONFIG, "file:1/model.onnx": "A" * 4096}})
    async with inprocess_server(repo, model_control_mode="explicit", max_request_bytes=2048) as (_, client):
        resp = await client.post("/v2/repository/models/big/load", content=body,
                                 headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert "request JSON size" in resp.json()["error"]
    assert " exceeds the maximum allowed input size. " in resp.json()["error"]


async def test_load_and_unload_outside_explicit_mode_use_tritons_text(tmp_path):
    repo = build_triton_examples(tmp_path / "repo")
    port = free_port()
    async with inprocess_server(repo, model_control_mode="poll", grpc_port=port):
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            for call in (client.load_model, client.unload_model):
                with pytest.raises(InferenceServerException,
                                   match="explicit model load / unload is not allowed if polling is enabled"):
                    await call("simple")
            assert await client.is_model_ready("simple")
        finally:
            await client.close()
