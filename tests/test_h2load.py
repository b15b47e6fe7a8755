"""loadtests/h2load.py, the bench's C load generator: its cells must count exactly what the server answered,
over HTTP/1.1 (V2 binary and JSON) and gRPC, and count as errors what h2load itself cannot see (a gRPC error
is an HTTP 200 whose grpc-status is in the trailers; a 4xx is in its per-request log)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from loadtests import h2load
from loadtests.generator import Target, fetch_model_info
from loadtests.grpcload import encode_grpc
from loadtests.payloads import encode
from loadtests.serverproc import serve
from tests.onnx_builders import scale_model, write_config

pytestmark = pytest.mark.skipif(h2load.available() is None,
                                reason="h2load is not installed (Debian's nghttp2-client; `make tools` installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("h2load") / "models"
    scale_model(root / "scale" / "1" / "model.onnx", factor=3.0)
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n")
    with serve(root, log_path=root.parent / "server.log", grpc=True) as srv:
        target = Target(srv.url, "scale", grpc_url=srv.grpc_url)

        async def info():
            async with aiohttp.ClientSession() as session:
                return await fetch_model_info(session, target)

        yield target, asyncio.run(info())


@pytest.mark.parametrize("protocol", ["binary", "json", "grpc"])
def test_a_cell_counts_what_the_server_answered(server, protocol):
    target, info = server
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    req = encode_grpc(x, info=info, model="scale", version=None) if protocol == "grpc" else \
        encode(x, info=info, protocol=protocol)
    level = h2load.measure_level(target, info=info, protocol=protocol, concurrency=4, req=req, seconds=0.3)
    assert level.ok > 0 and not level.errors, level.error_samples
    assert level.ok == len(level.latencies_s) == level.requested
    delta = (h2load._counts(level.stats_after)[0] - h2load._counts(level.stats_before)[0])
    assert delta == level.ok  # every request h2load completed was one success on the server, none more
    assert level.client_cpu_s > 0 and level.elapsed_s > 0


def test_errors_hidden_from_h2load_are_counted(server):
    target, info = server
    x = {"x": np.zeros((1, 4), dtype=np.float32)}
    # gRPC: unknown model -> HTTP 200 with grpc-status NOT_FOUND in the trailers; h2load calls it a success
    bad = encode_grpc(x, info=info, model="no-such-model", version=None)
    with pytest.raises(RuntimeError, match="grpc answer"):
        h2load.check_one(target, info=info, protocol="grpc", req=bad)
    level = h2load.measure_level(target, info=info, protocol="grpc", concurrency=2, req=bad, seconds=0.2, check=False)
    assert level.ok == 0 and level.errors["not a success on the server"] == level.requested > 0
    # HTTP: a body of the wrong width -> 400 in h2load's per-request log
    wrong = encode({"x": np.zeros((1, 5), dtype=np.float32)}, info=info, protocol="binary")
    with pytest.raises(RuntimeError, match="HTTP 400"):
        h2load.check_one(target, info=info, protocol="binary", req=wrong)
    level = h2load.measure_level(target, info=info, protocol="binary", concurrency=2, req=wrong, seconds=0.2,
                                 check=False)
    assert level.ok == 0 and level.errors["non-2xx status"] == level.requested > 0
