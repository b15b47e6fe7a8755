"""I/O binding (service/iobinding.py): on CPU with MODELSERVE_IO_BINDING=on the bound path must give what
the plain session.run gives; the pinned-buffer branch needs CUDA and is skipped without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.iobinding import BoundRunner, PinnedBuffer
from service.modelrepo.config import graph_tensors
from service.modelrepo.sessions import create_session
from service.runtime import InstancePool, InstanceSetup
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, two_io_model, write_config

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _pool(path: Path, *, io_binding: str, count: int = 1, max_batch_size: int = 8,
          providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> InstancePool:
    setups = [InstanceSetup(path, list(providers)) for _ in range(count)]
    pool = InstancePool(setups, intra_op_threads=1, allow_spinning=False)
    pool.configure_io_binding(mode=io_binding, max_batch_size=max_batch_size)
    return pool


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bound_run_equals_plain_run_with_preallocated_outputs(tmp_path: Path, rows: int) -> None:
    path = scale_model(tmp_path / "m.onnx", factor=3.0, width=5)
    bound, plain = _pool(path, io_binding="on"), _pool(path, io_binding="off")
    assert (bound.bound, plain.bound) == (1, 0)
    [runner] = bound.runners()
    assert runner is not None and set(runner.out_buffers) == {"y"} and runner.out_buffers["y"].shape == (8, 5)
    x = np.random.default_rng(rows).standard_normal((rows, 5)).astype(np.float32)
    [got], [want] = bound.run({"x": x}, ["y"]), plain.run({"x": x}, ["y"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, x * 3.0, rtol=1e-6)


def test_results_are_copies_not_views_of_the_reused_buffer(tmp_path: Path) -> None:
    pool = _pool(scale_model(tmp_path / "m.onnx", width=4), io_binding="on")
    [first] = pool.run({"x": np.ones((2, 4), np.float32)}, ["y"])
    pool.run({"x": np.full((2, 4), 5.0, np.float32)}, ["y"])
    np.testing.assert_array_equal(first, np.full((2, 4), 2.0, np.float32))


def test_dynamic_dims_and_several_outputs_fall_back_to_ort_allocation(tmp_path: Path) -> None:
    path = two_io_model(tmp_path / "two.onnx")
    bound, plain = _pool(path, io_binding="on"), _pool(path, io_binding="off")
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((3, 7)).astype(np.float32), "b": rng.standard_normal((3, 7)).astype(np.float32)}
    for names in (["sum", "idx"], ["idx"], ["idx", "sum"]):
        got, want = bound.run(dict(feeds), names), plain.run(dict(feeds), names)
        assert [g.dtype for g in got] == [w.dtype for w in want]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_rows_past_the_buffer_and_auto_mode_on_cpu(tmp_path: Path) -> None:
    path = scale_model(tmp_path / "m.onnx", width=4)
    assert _pool(path, io_binding="auto", count=2).bound == 0  # auto: only instances on a GPU provider
    pool = _pool(path, io_binding="on", max_batch_size=2)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)  # more rows than the buffer holds: ORT allocates
    np.testing.assert_array_equal(pool.run({"x": x}, ["y"])[0], x * 2)


async def test_server_with_io_binding_on_answers_as_without(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx", factor=4.0, width=3)
    write_config(repo / "m", "max_batch_size: 4\ndynamic_batching { }\ninstance_group [ { count: 2 kind: KIND_CPU } ]")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]}
    answers = []
    for mode in ("on", "off"):
        async with inprocess_server(repo, io_binding=mode) as (server, client):
            assert server.core.model("m").pool.bound == (2 if mode == "on" else 0)
            resp = await client.post("/v2/models/m/infer", json=body)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json()["outputs"])
    assert answers[0] == answers[1] and answers[0][0]["data"] == [4, 8, 12, 16, 20, 24]


@pytest.mark.skipif(not HAS_CUDA, reason="pinned host buffers need CUDA (onnxruntime-gpu and a GPU); none here")
def test_cuda_instance_binds_pinned_buffers(tmp_path: Path) -> None:
    path = scale_model(tmp_path / "m.onnx", width=16)
    session = create_session(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    inputs, outputs = graph_tensors(session)
    runner = BoundRunner(session, inputs=inputs, outputs=outputs, max_rows=32)
    assert runner.pinned and any(isinstance(o, PinnedBuffer) for o in runner._owners)
    x = np.random.default_rng(0).standard_normal((17, 16)).astype(np.float32)
    np.testing.assert_allclose(runner.run({"x": x}, ["y"])[0], x * 2, rtol=1e-6)


async def test_buffers_follow_the_completed_max_batch_size(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx", width=3)  # no config.pbtxt: auto-complete picks max_batch_size
    async with inprocess_server(repo, io_binding="on", default_max_batch_size=16) as (server, client):
        [runner] = server.core.model("m").pool.runners()
        assert runner is not None and runner.out_buffers["y"].shape == (16, 3)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
        assert (await client.post("/v2/models/m/infer", json=body)).json()["outputs"][0]["data"] == [2, 4, 6]


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback where CUDA cannot pin memory")
def test_pinned_mode_without_cuda_stages_inputs_in_pageable_buffers(tmp_path: Path, caplog) -> None:
    session = create_session(scale_model(tmp_path / "m.onnx", width=4))
    inputs, outputs = graph_tensors(session)
    runner = BoundRunner(session, inputs=inputs, outputs=outputs, max_rows=8, pinned=True)
    assert "pinned host buffer unavailable" in caplog.text
    assert set(runner.in_buffers) == {"x"} and not any(isinstance(o, PinnedBuffer) for o in runner._owners)
    for rows in (3, 8, 9):  # 9: past the staging buffer, bound straight from the request's array
        x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        np.testing.assert_array_equal(runner.run({"x": x}, ["y"])[0], x * 2)
