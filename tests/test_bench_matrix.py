"""`make bench`'s serving matrix: each policy's copy of a model is served with that policy, and the report
has one row per measured cell next to the ceilings of the same run."""

from __future__ import annotations

from pathlib import Path

from loadtests.bench import _ratios
from loadtests.benchmatrix import POLICIES, model_name, write_cnn_models
from loadtests.benchreport import table_rows
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model


async def test_each_policy_copy_is_served_with_its_policy(tmp_path: Path):
    onnx = scale_model(tmp_path / "scale.onnx")
    repo = tmp_path / "repo"
    write_cnn_models(repo, onnx_paths={"a": onnx, "b": onnx}, delay_us=3000, policies=list(POLICIES))
    async with inprocess_server(repo, warmup=False) as (server, _):
        for cnn in ("a", "b"):
            none, fixed, adaptive = (server.core.model(model_name(cnn, p)).batcher for p in POLICIES)
            assert none is not None and none.policy is None  # no dynamic batching: each request alone
            assert fixed is not None and fixed.policy is not None and not fixed.adaptive
            assert adaptive is not None and adaptive.adaptive
            assert fixed.policy.max_queue_delay_us == adaptive.policy.max_queue_delay_us == 3000


def test_report_rows_put_each_cell_next_to_its_own_ceiling():
    point = {"batch": 1, "latency_ms": 0.5, "rows_per_s": 2000.0, "runs": 10}
    best = {"batch": 8, "latency_ms": 2.0, "rows_per_s": 4000.0, "runs": 10}
    doc = {"ceilings": {"zoo_cnn": {"points": [point, best], "best": best, "others_cpu_pct": 0.0}},
           "serve": [{"cnn": "zoo_cnn", "batching": p, "protocol": "grpc", "concurrency": 32, "rows_per_s": 1000.0,
                      "p50_ms": 1.5, "p99_ms": 3.0, "server": {"mean_batch_size": 4.0}, "errors": 0,
                      "warmup_errors": 0, "server_cpu_us_per_req": 250.0, "others_cpu_pct": 5.0} for p in POLICIES]}
    _ratios(doc)
    rows = table_rows(doc)
    assert [r[0] for r in rows] == ["ceiling", "serve", "serve", "serve"]
    assert [r[2] for r in rows[1:]] == list(POLICIES)
    # ratio to the best in-process rate of the same model; p50 less the in-process batch-1 latency
    assert {(r[8], r[10], r[13]) for r in rows[1:]} == {("0.25", "1.00", "250")}
    assert {r[4] for r in rows[1:]} == {"python"}  # the load generator of each cell (no "client": the Python one)
