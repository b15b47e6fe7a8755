"""The load generator's gRPC protocol (loadtests/grpcload.py) against the real server's gRPC port."""

from __future__ import annotations

import pytest

from loadtests.generator import LoadConfig, Target, run_load
from loadtests.report import summarize
from tests.conftest import free_port
from tests.onnx_builders import gather_model, scale_model, write_config

REQUESTS = 40


@pytest.fixture(scope="module")
def urls(tmp_path_factory, serve_repository):
    repo = tmp_path_factory.mktemp("loadgrpc") / "models"
    scale_model(repo / "scale" / "1" / "model.onnx", factor=2.0, width=4)
    write_config(repo / "scale", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    gather_model(repo / "gather" / "1" / "model.onnx", rows=10)
    write_config(repo / "gather", "max_batch_size: 8\n")
    grpc_port = free_port()
    with serve_repository(repo, extra_args=["--grpc-port", str(grpc_port)]) as url:
        yield url, f"127.0.0.1:{grpc_port}"


async def test_grpc_level_counts_every_request_and_the_server_agrees(urls) -> None:
    http_url, grpc_url = urls
    cfg = LoadConfig(target=Target(http_url, "scale", grpc_url=grpc_url), protocols=["grpc"], concurrencies=[1, 4],
                     requests=REQUESTS, time_cap_s=60, progress=False)
    _, results = await run_load(cfg)
    assert [(r.protocol, r.concurrency) for r in results] == [("grpc", 1), ("grpc", 4)]
    for r in map(summarize, results):
        assert (r["ok"], r["errors"], r["warmup_errors"]) == (REQUESTS, 0, 0), r["error_samples"]
        assert r["server"]["counts"]["success_count"] == REQUESTS  # warm-up ran before the first snapshot


async def test_grpc_errors_are_counted_by_status(urls) -> None:
    http_url, grpc_url = urls
    # Indices drawn from [0, 1000) into a 10-row table: (nearly) every request is refused with a 400.
    cfg = LoadConfig(target=Target(http_url, "gather", grpc_url=grpc_url), protocols=["grpc"], concurrencies=[2],
                     requests=10, time_cap_s=60, progress=False, int_high=1000)
    _, (level,) = await run_load(cfg)
    assert set(level.errors) == {"gRPC INVALID_ARGUMENT"} and level.ok + level.errors.total() == 10
    assert level.error_samples and all("gRPC INVALID_ARGUMENT" in s for s in level.error_samples)
