"""Trace and logging extensions with the real tritonclient (HTTP and gRPC): settings round trips, spans
written for sampled requests (rate, count, per-model overrides), and log settings driving the real loggers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.log_settings import ModelserveFormatter
from tests.conftest import free_port, run_server, wait_until
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trace") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    scale_model(root / "other" / "1" / "model.onnx", factor=3.0)
    return root


@pytest.fixture(scope="module")
def server(repo):
    trace_file = repo.parent / "trace.jsonl"
    grpc_port = free_port()
    with run_server(repo, extra_args=["--trace-file", str(trace_file), "--grpc-port", str(grpc_port)]) as url:
        yield {"http": url, "grpc": f"127.0.0.1:{grpc_port}", "file": trace_file}


def _spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _roots(path: Path, model: str) -> list[dict]:
    return [s for s in _spans(path) if s["name"] == "InferRequest" and s["attributes"]["model_name"] == model]


def _infer(client, module, model: str, n: int = 1) -> None:
    x = np.ones((1, 4), np.float32)
    for _ in range(n):
        inp = module.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        client.infer(model, [inp])


def test_settings_defaults_and_round_trip_over_http_and_grpc(server):
    http = httpclient.InferenceServerClient(server["http"])
    g = grpcclient.InferenceServerClient(server["grpc"])
    settings = http.get_trace_settings()
    assert settings["trace_level"] == ["OFF"] and settings["trace_rate"] == "1000"
    assert settings["trace_count"] == "-1" and settings["trace_mode"] == "triton"
    assert settings["trace_file"] == str(server["file"])
    updated = g.update_trace_settings(settings={"trace_rate": "7", "log_frequency": "3"}).settings
    assert list(updated["trace_rate"].value) == ["7"] and list(updated["log_frequency"].value) == ["3"]
    assert http.get_trace_settings()["trace_rate"] == "7"
    http.update_trace_settings(settings={"trace_rate": None, "log_frequency": None})
    cleared = http.get_trace_settings()  # null on a global setting: back to its start-up value, as in Triton
    assert cleared["trace_rate"] == "1000" and cleared["log_frequency"] == "0"
    http.update_trace_settings(settings={"trace_rate": "1000", "log_frequency": "0"})
    for bad in ({"trace_rate": "0"}, {"trace_level": ["LOUD"]}, {"trace_count": "-2"}, {"nope": "1"},
                {"trace_file": "/tmp/elsewhere"}):
        with pytest.raises(InferenceServerException) as info:
            http.update_trace_settings(settings=bad)
        assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match="can not be updated through network protocol"):
        g.update_trace_settings(settings={"trace_file": "/tmp/x"})
    with pytest.raises(InferenceServerException, match="unknown"):
        http.get_trace_settings(model_name="unknown")


def test_sampled_requests_produce_decode_queue_compute_encode_spans(server):
    http = httpclient.InferenceServerClient(server["http"])
    g = grpcclient.InferenceServerClient(server["grpc"])
    http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "-1"})
    try:
        _infer(http, httpclient, "scale", 1)
        _infer(g, grpcclient, "scale", 1)
        roots = wait_until(lambda: len(_roots(server["file"], "scale")) >= 2 and _roots(server["file"], "scale"),
                           what="two InferRequest spans")
        spans = _spans(server["file"])
        for root in roots[:2]:
            trace_id = root["context"]["trace_id"]
            children = {s["name"] for s in spans if s["context"]["trace_id"] == trace_id and s["name"] != "InferRequest"}
            assert children == {"decode", "queue", "compute", "encode"}
            assert root["attributes"]["model_version"] == "1"
    finally:
        http.update_trace_settings(settings={"trace_level": ["OFF"], "trace_rate": "1000"})


def test_rate_count_and_per_model_overrides(server):
    http = httpclient.InferenceServerClient(server["http"])
    g = grpcclient.InferenceServerClient(server["grpc"])
    before_scale, before_other = len(_roots(server["file"], "scale")), len(_roots(server["file"], "other"))
    http.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "-1"})
    # "other" overrides the count: 1 more trace, then none; "scale" follows the global rate: 1 in 2.
    other = g.update_trace_settings(model_name="other", settings={"trace_rate": "1", "trace_count": "1"}).settings
    assert list(other["trace_count"].value) == ["1"] and list(other["trace_level"].value) == ["TIMESTAMPS"]
    try:
        _infer(http, httpclient, "scale", 4)
        _infer(http, httpclient, "other", 3)
        wait_until(lambda: len(_roots(server["file"], "scale")) - before_scale >= 2, what="scale traces")
        assert http.get_trace_settings(model_name="other")["trace_count"] == "0"
        assert len(_roots(server["file"], "scale")) - before_scale == 2
        assert len(_roots(server["file"], "other")) - before_other == 1
        # Clearing the model's overrides puts it back on the global settings.
        cleared = http.update_trace_settings(model_name="other", settings={"trace_rate": None, "trace_count": None})
        assert cleared["trace_rate"] == "2"
    finally:
        http.update_trace_settings(settings={"trace_level": ["OFF"], "trace_rate": "1000"})
    _infer(http, httpclient, "scale", 2)
    assert len(_roots(server["file"], "scale")) - before_scale == 2  # tracing off: no new spans


def test_log_settings_over_http_client(server):
    http = httpclient.InferenceServerClient(server["http"])
    settings = http.get_log_settings()
    assert settings == {"log_file": "", "log_info": False, "log_warning": True, "log_error": True,
                        "log_verbose_level": 0, "log_format": "default"}  # the test server runs --log-level warning
    assert http.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
    for bad in ({"log_verbose_level": -1}, {"log_info": "yes"}, {"log_format": "xml"}, {"log_file": "/tmp/l"}):
        with pytest.raises(InferenceServerException) as info:
            http.update_log_settings(bad)
        assert info.value.status() == "400"
    http.update_log_settings({"log_verbose_level": 0})


async def test_log_settings_change_the_real_loggers_over_grpc(repo):
    port = free_port()
    logger = logging.getLogger("modelserve")
    async with inprocess_server(repo, grpc_port=port, warmup=False):
        async with grpcaio.InferenceServerClient(f"127.0.0.1:{port}") as client:
            assert logger.getEffectiveLevel() == logging.INFO
            resp = await client.update_log_settings({"log_verbose_level": 2, "log_format": "ISO8601"})
            assert resp.settings["log_verbose_level"].uint32_param == 2
            assert logger.getEffectiveLevel() == logging.DEBUG
            record = logging.LogRecord("modelserve.x", logging.INFO, __file__, 1, "hello", None, None)
            line = ModelserveFormatter().format(record)
            assert line.endswith("modelserve.x] hello") and line[10] == "T" and line[19] == "Z"
            await client.update_log_settings({"log_verbose_level": 0, "log_info": False, "log_warning": False,
                                              "log_format": "default"})
            assert logger.getEffectiveLevel() == logging.ERROR
            assert ModelserveFormatter().format(record).endswith("INFO modelserve.x: hello")
            got = (await client.get_log_settings()).settings
            assert got["log_info"].bool_param is False and got["log_error"].bool_param is True
    logger.setLevel(logging.NOTSET)
