"""The load generator against the real server: every request is counted, and the stats delta matches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from loadtests.__main__ import main as loadtests_main
from loadtests.generator import LoadConfig, Target, build_bodies, run_load
from loadtests.payloads import ModelInfo, TensorMeta, check_response, encode, request_shapes
from loadtests.report import summarize
from tests.onnx_builders import gather_model, scale_model, write_config

REQUESTS = 40
GATHER_ROWS = 10


@pytest.fixture(scope="module")
def server_url(tmp_path_factory, serve_repository):
    repo = tmp_path_factory.mktemp("loadtests") / "models"
    scale_model(repo / "scale" / "1" / "model.onnx", factor=2.0, width=4)
    write_config(repo / "scale", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    gather_model(repo / "gather" / "1" / "model.onnx", rows=GATHER_ROWS)
    write_config(repo / "gather", "max_batch_size: 8\n")  # no batching: each bad index fails alone
    with serve_repository(repo) as url:
        yield url


async def test_json_and_binary_all_ok_and_stats_delta(server_url: str) -> None:
    cfg = LoadConfig(target=Target(server_url, "scale"), protocols=["json", "binary"], concurrencies=[1, 4],
                     requests=REQUESTS, time_cap_s=30, progress=False)
    info, results = await run_load(cfg)
    assert info.batched and [t.name for t in info.inputs] == ["x"]
    assert [(r.protocol, r.concurrency) for r in results] == [("json", 1), ("json", 4), ("binary", 1), ("binary", 4)]
    for r in map(summarize, results):
        where = f"{r['protocol']} c={r['concurrency']}"
        assert (r["ok"], r["errors"], r["warmup_errors"]) == (REQUESTS, 0, 0), f"{where}: {r['error_samples']}"
        assert not r["time_capped"] and r["requests_per_s"] > 0
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        counts = r["server"]["counts"]
        # Warm-up ran before the first snapshot, so the server counted exactly the measured requests.
        assert counts["inference_count"] == REQUESTS, where
        assert counts["success_count"] == counts["queue_count"] == counts["compute_infer_count"] == REQUESTS, where
        assert counts["fail_count"] == 0
        assert 1 <= counts["execution_count"] <= REQUESTS
        assert r["server"]["mean_batch_size"] == pytest.approx(REQUESTS / counts["execution_count"])
        assert r["server"]["queue_ms"] >= 0 and r["server"]["compute_infer_ms"] > 0
        if r["concurrency"] == 1:
            assert counts["execution_count"] == REQUESTS  # one request in flight: nothing to batch with


def _bad_index_count(cfg: LoadConfig, info: ModelInfo, *, requests: int) -> int:
    bodies = build_bodies(info, cfg, protocol="json")
    bad = [orjson.loads(b.body)["inputs"][0]["data"][0] >= GATHER_ROWS for b in bodies]
    return sum(bad[i % len(bodies)] for i in range(requests))


async def test_server_errors_are_counted_not_hidden(server_url: str) -> None:
    # Indices drawn from [0, 2 * rows): the ones >= rows make ONNX Runtime fail on the server.
    cfg = LoadConfig(target=Target(server_url, "gather"), protocols=["json"], concurrencies=[2], requests=REQUESTS,
                     warmup=1, int_high=2 * GATHER_ROWS, time_cap_s=30, progress=False, seed=3)
    info, (result,) = await run_load(cfg)
    expected_bad = _bad_index_count(cfg, info, requests=REQUESTS)
    assert 0 < expected_bad < REQUESTS, "seed must give a mix of good and bad indices"
    r = summarize(result)
    assert (r["ok"], r["errors"]) == (REQUESTS - expected_bad, expected_bad)
    assert all(kind.startswith("HTTP ") for kind in r["errors_by_kind"]), r["errors_by_kind"]
    assert r["error_samples"]
    counts = r["server"]["counts"]
    assert (counts["success_count"], counts["fail_count"]) == (REQUESTS - expected_bad, expected_bad)


def test_cli_writes_json_and_exit_status(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    argv = ["--url", server_url, "--model", "scale", "--protocol", "binary", "--concurrency", "2",
            "--requests", "20", "--batch", "3", "--no-progress", "--output", str(out)]
    assert loadtests_main(argv) == 0
    (level,) = orjson.loads(out.read_bytes())["levels"]
    assert (level["ok"], level["errors"]) == (20, 0)
    assert level["rows_per_s"] == pytest.approx(3 * level["requests_per_s"])
    assert level["server"]["counts"]["inference_count"] == 60  # rows, not requests
    bad = ["--url", server_url, "--model", "gather", "--concurrency", "1", "--requests", "10", "--int-high", "100",
           "--no-progress"]
    assert loadtests_main(bad) == 1
    assert loadtests_main(["--url", server_url, "--model", "nope", "--requests", "1", "--no-progress"]) == 2


INFO = ModelInfo(name="m", max_batch_size=8, inputs=(TensorMeta("a", "FP32", (-1, 3)), TensorMeta("s", "BYTES", (-1, -1))),
                 outputs=(TensorMeta("y", "FP32", (-1, 3)),))


def test_dynamic_dims_need_a_shape_flag() -> None:
    with pytest.raises(ValueError, match=r"--shape s=N"):
        request_shapes(INFO, batch=2, overrides={})
    assert request_shapes(INFO, batch=2, overrides={"s": [5]}) == {"a": [2, 3], "s": [2, 5]}
    with pytest.raises(ValueError, match="max_batch_size 8"):
        request_shapes(INFO, batch=9, overrides={"s": [5]})


def test_binary_encoding_layout_and_response_check() -> None:
    inputs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array([[b"hi"], [b"xyz"]], dtype=object)}
    req = encode(inputs, info=INFO, protocol="binary")
    hlen = int(req.headers["Inference-Header-Content-Length"])
    header = orjson.loads(req.body[:hlen])
    assert [i["parameters"]["binary_data_size"] for i in header["inputs"]] == [24, 4 + 2 + 4 + 3]
    assert req.body[hlen:hlen + 24] == inputs["a"].tobytes()
    assert header["parameters"]["binary_data_output"] is True and req.rows == 2
    good = orjson.dumps({"outputs": [{"name": "y", "shape": [2, 3], "parameters": {"binary_data_size": 24}}]})
    assert check_response(good + bytes(24), header_length=str(len(good)), info=INFO, rows=2) is None
    assert "bytes" in (check_response(good + bytes(20), header_length=str(len(good)), info=INFO, rows=2) or "")
    assert "lacks" in (check_response(b'{"outputs": []}', header_length=None, info=INFO, rows=2) or "")
