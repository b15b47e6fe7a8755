"""The repository in-process: poll-mode reloads, a request in flight on a replaced version, removal, and the
poll loop itself. Polls are driven by calling `poll_once()`, so nothing waits on the poll interval."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest

from service.errors import InvalidInput, ModelNotFound
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config


def _x(value: float = 1.0) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}]}


async def _wait_for(condition, *, timeout: float = 30.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def test_reload_keeps_the_in_flight_request_on_its_version(tmp_path):
    root = tmp_path / "models"
    scale_model(root / "m" / "1" / "model.onnx", factor=1.0)
    write_config(root / "m", "max_batch_size: 4\ninstance_group [{ count: 1 kind: KIND_CPU }]\n")
    async with inprocess_server(root, model_control_mode="poll", repository_poll_secs=3600) as (server, client):
        old = server.core.model("m")
        running, release = threading.Event(), threading.Event()
        original = old.pool.run

        def gated_run(feeds, output_names):  # holds version 1's execution until the swap is done
            running.set()
            assert release.wait(30)
            return original(feeds, output_names)

        old.pool.run = gated_run  # type: ignore[method-assign]
        in_flight = asyncio.create_task(client.post("/v2/models/m/infer", json=_x(2.0)))
        await _wait_for(running.is_set, what="version 1 to start running the request")
        scale_model(tmp_path / "staging" / "2" / "model.onnx", factor=5.0)
        shutil.copytree(tmp_path / "staging" / "2", root / "m" / "2")
        await server.repository.poll_once()
        assert server.core.model("m").version == "2"
        fresh = (await client.post("/v2/models/m/infer", json=_x(1.0))).json()
        assert fresh["model_version"] == "2" and fresh["outputs"][0]["data"] == [5.0] * 4
        release.set()
        done = await in_flight
        assert done.status_code == 200, done.text
        assert done.json()["model_version"] == "1" and done.json()["outputs"][0]["data"] == [2.0] * 4


async def test_poll_adds_and_removes_models_and_skips_unchanged(tmp_path):
    root = tmp_path / "models"
    scale_model(root / "m" / "1" / "model.onnx")
    async with inprocess_server(root, model_control_mode="poll", repository_poll_secs=3600) as (server, client):
        first = server.core.model("m")
        await server.repository.poll_once()
        assert server.core.model("m") is first  # unchanged on disk: not reloaded
        scale_model(tmp_path / "staging" / "n" / "1" / "model.onnx")
        shutil.copytree(tmp_path / "staging" / "n", root / "n")
        await server.repository.poll_once()
        assert (await client.get("/v2/models/n/ready")).status_code == 200
        shutil.rmtree(root / "n")
        await server.repository.poll_once()
        assert (await client.get("/v2/models/n/ready")).status_code == 404
        assert [r["name"] for r in server.core.repository_index()] == ["m"]


async def test_the_poll_loop_runs_on_its_interval(tmp_path):
    root = tmp_path / "models"
    scale_model(root / "m" / "1" / "model.onnx")
    async with inprocess_server(root, model_control_mode="poll", repository_poll_secs=0.05) as (server, _):
        scale_model(tmp_path / "staging" / "n" / "1" / "model.onnx")
        shutil.copytree(tmp_path / "staging" / "n", root / "n")
        await _wait_for(lambda: server.core.model_ready("n", None), what="the poller to load model n")


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../x", "/etc", ".hidden", "x\x00y"])
async def test_load_refuses_names_outside_the_repository(tmp_path, name):
    root = tmp_path / "repo" / "models"
    scale_model(root / "m" / "1" / "model.onnx")
    scale_model(tmp_path / "repo" / "1" / "model.onnx")  # what "<repo>/.." would load
    async with inprocess_server(root, model_control_mode="explicit") as (server, _):
        with pytest.raises((InvalidInput, ModelNotFound)):
            await server.core.load_model(name)
        assert [r["name"] for r in server.core.repository_index()] == ["m"]


async def test_index_and_errors_never_show_absolute_paths(tmp_path):
    root = tmp_path / "models"
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    async with inprocess_server(root) as (server, client):
        rows = server.core.repository_index()
        assert rows[0]["state"] == "UNAVAILABLE" and "broken/1/model.onnx" in rows[0]["reason"]
        assert str(tmp_path) not in str(rows)
        answer = (await client.post("/v2/models/broken/infer", json=_x())).json()["error"]
        assert str(tmp_path) not in answer
