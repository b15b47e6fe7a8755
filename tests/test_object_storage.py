"""Model repositories in object storage, against a real S3-compatible server (moto's, on a loopback port):
the mirror itself (`service.modelrepo.remote.sync`), and a real `modelserve serve` on s3://bucket/models in
poll mode, driven by tritonclient while versions are added and a model is removed in the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import tritonclient.http as httpclient
from moto.server import ThreadedMotoServer
from pydantic import ValidationError

from service.errors import ModelLoadError
from service.modelrepo import remote
from service.settings import ServerSettings
from tests.conftest import REPO_ROOT, free_port, run_server, wait_until
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model

BUCKET = "modelserve-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server and the environment (credentials, endpoint) that s3fs and the server read."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket=BUCKET)
        yield env, s3
    server.stop()


def _upload_model(s3, tmp: Path, *, key_prefix: str, factor: float) -> None:
    path = scale_model(tmp / f"model-{factor}.onnx", factor=factor)
    s3.upload_file(str(path), BUCKET, f"{key_prefix}/model.onnx")


def test_sync_mirrors_changes_and_confines_keys(s3_env, tmp_path):
    _, s3 = s3_env
    prefix = "sync"
    _upload_model(s3, tmp_path, key_prefix=f"{prefix}/scale/1", factor=2.0)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/scale/../../escape.txt", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/.hidden/1/model.onnx", Body=b"x")
    cache = tmp_path / "cache"
    url = f"s3://{BUCKET}/{prefix}"

    assert remote.sync(url, cache) == ["scale"]
    assert (cache / "scale" / "1" / "model.onnx").is_file()
    assert not (tmp_path / "escape.txt").exists() and not (cache / ".hidden").exists()
    assert remote.sync(url, cache) == []  # nothing changed: nothing downloaded

    _upload_model(s3, tmp_path, key_prefix=f"{prefix}/scale/2", factor=3.0)
    assert remote.sync(url, cache) == ["scale"]
    assert sorted(p.name for p in (cache / "scale").iterdir()) == ["1", "2"]

    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/scale/1/model.onnx")
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/scale/2/model.onnx")
    assert remote.sync(url, cache) == ["scale"]
    assert not (cache / "scale").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith((".sync-", ".old-"))]


def test_unreachable_bucket_is_a_clear_error(s3_env, tmp_path):
    with pytest.raises(ModelLoadError, match="cannot list model repository s3://no-such-bucket"):
        remote.sync("s3://no-such-bucket/models", tmp_path)


def test_settings_accept_paths_and_object_store_urls():
    assert ServerSettings(model_repository="repo").model_repository == Path("repo")
    assert ServerSettings(model_repository="s3://b/models").model_repository == "s3://b/models"
    with pytest.raises(ValidationError, match=r"unsupported scheme 'http'.*s3://"):
        ServerSettings(model_repository="http://example.com/models")
    with pytest.raises(ValidationError, match="names no bucket"):
        ServerSettings(model_repository="s3://")


def test_missing_filesystem_names_the_extra(tmp_path):
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ModelLoadError, match=r"pip install 'modelserve\[gcs\]'"):
        remote.sync("gs://bucket/models", tmp_path)


def _infer(client: httpclient.InferenceServerClient, version: str = "") -> np.ndarray:
    x = np.ones((1, 4), dtype=np.float32)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("scale", [inp], model_version=version).as_numpy("y")


def test_server_serves_and_polls_an_s3_repository(s3_env, tmp_path):
    env, s3 = s3_env
    prefix = "served"
    _upload_model(s3, tmp_path, key_prefix=f"{prefix}/scale/1", factor=2.0)
    cache = tmp_path / "cache"
    args = ["--repository-cache-dir", str(cache), "--model-control-mode", "poll", "--repository-poll-secs", "0.2"]
    with run_server(tmp_path / "unused", extra_args=args, env=env, repository=f"s3://{BUCKET}/{prefix}") as url:
        client = httpclient.InferenceServerClient(url)
        np.testing.assert_allclose(_infer(client), np.full((1, 4), 2.0))

        _upload_model(s3, tmp_path, key_prefix=f"{prefix}/scale/2", factor=3.0)
        wait_until(lambda: client.get_model_metadata("scale")["versions"] == ["2"], what="version 2 from the bucket to serve")
        np.testing.assert_allclose(_infer(client, "2"), np.full((1, 4), 3.0))
        assert (cache / "scale" / "2" / "model.onnx").is_file()

        for v in ("1", "2"):
            s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/scale/{v}/model.onnx")
        wait_until(lambda: not client.is_model_ready("scale"), what="the removed model to unload")
        assert not (cache / "scale").exists()


async def test_explicit_load_reads_the_bucket_as_it_is_now(s3_env, tmp_path):
    """In explicit mode nothing polls: a load request re-syncs, so a model uploaded after start can load."""
    _, s3 = s3_env
    prefix = "explicit"
    _upload_model(s3, tmp_path, key_prefix=f"{prefix}/first/1", factor=2.0)
    async with inprocess_server(f"s3://{BUCKET}/{prefix}", model_control_mode="explicit", load_model=["first"],
                                repository_cache_dir=tmp_path / "cache") as (_server, client):
        assert (await client.get("/v2/models/first/ready")).status_code == 200
        late = await client.post("/v2/repository/models/late/load")
        assert late.status_code == 404 and "no model 'late'" in late.json()["error"]

        _upload_model(s3, tmp_path, key_prefix=f"{prefix}/late/1", factor=5.0)
        assert (await client.post("/v2/repository/models/late/load")).status_code == 200
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
        out = (await client.post("/v2/models/late/infer", json=body)).json()
        assert out["outputs"][0]["data"] == [5.0] * 4


def test_a_bucket_that_cannot_be_listed_stops_the_server_with_one_line(s3_env, tmp_path):
    env, _ = s3_env
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model-repository", "s3://no-such-bucket/m",
                           "--repository-cache-dir", str(tmp_path), "--http-port", str(free_port())],
                          cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("modelserve: cannot list model repository s3://no-such-bucket/m"), proc.stderr
    assert "Traceback" not in proc.stderr
