"""Adaptive batching through the real server: what it keeps of Triton's batching and what it changes.

Off by default (measured in round 4: docs/BENCHMARKS.md "Adaptive by default? (round 4)"); on server-wide with
`--adaptive-batching true`, and a model's own `adaptive_batching` parameter ("true" / "false") wins over that.

Kept: requests in flight together still form one batch; a model's own `adaptive_batching: false` keeps Triton's
fixed delay even when the server turns adaptive on. Changed: a request whose queue timeout the predicted batch
cost would miss is answered 503 at once, before any compute is spent on it. Delays that matter are a minute
long, so a batch that forms did so because of the decision under test, never because of timing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient

from service.batch_planner import Planner
from tests.conftest import run_server
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, slow_model, write_config
from tests.test_batcher import until

MINUTE_US = 60_000_000
ADAPTIVE_OFF = 'parameters { key: "adaptive_batching" value: { string_value: "false" } }\n'


def _body(value: float, *, width: int = 4, parameters: dict | None = None) -> dict:
    body: dict = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, width], "data": [value] * width}]}
    if parameters:
        body["parameters"] = parameters
    return body


async def _stats(client, model: str) -> dict:
    resp = await client.get(f"/v2/models/{model}/stats")
    assert resp.status_code == 200, resp.text
    return resp.json()["model_stats"][0]


def _reason_count(metrics: str, *, model: str, reason: str) -> int:
    prefix = f'modelserve_batch_fill_ratio_count{{model="{model}",reason="{reason}",version="1"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return int(float(lines[0].removeprefix(prefix))) if lines else 0


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    scale_model(tmp_path / "batched" / "1" / "model.onnx")
    write_config(tmp_path / "batched", f"max_batch_size: 4\ndynamic_batching {{ max_queue_delay_microseconds: {MINUTE_US} }}\n")
    scale_model(tmp_path / "triton_delay" / "1" / "model.onnx")
    write_config(tmp_path / "triton_delay", "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n"
                 + ADAPTIVE_OFF)
    # A run of several hundred ms: the queue timeout below is far shorter than any prediction of it.
    slow_model(tmp_path / "slow" / "1" / "model.onnx", repeats=300)
    write_config(tmp_path / "slow", "max_batch_size: 1\ndynamic_batching { default_queue_policy { "
                 "default_timeout_microseconds: 600000000 allow_timeout_override: true } }\n"
                 "instance_group [{ count: 1 kind: KIND_CPU }]\n")
    return tmp_path


async def test_requests_in_flight_together_still_form_one_batch(repo):
    async with inprocess_server(repo, adaptive_batching=True, warmup=False) as (_, client):
        before = await _stats(client, "batched")
        answers = await asyncio.wait_for(asyncio.gather(
            *(client.post("/v2/models/batched/infer", json=_body(float(i))) for i in range(4))), timeout=30)
        after = await _stats(client, "batched")
        metrics = (await client.get("/metrics")).text
    for i, resp in enumerate(answers):
        assert resp.status_code == 200, resp.text
        assert resp.json()["outputs"][0]["data"] == [2.0 * i] * 4
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["execution_count"] - before["execution_count"] == 1, "four requests queued together ran apart"
    assert _reason_count(metrics, model="batched", reason="full") == 1


async def test_a_model_can_keep_tritons_fixed_delay_when_the_server_is_adaptive(repo):
    async with inprocess_server(repo, adaptive_batching=True, warmup=False) as (_, client):
        alone = await asyncio.wait_for(client.post("/v2/models/batched/infer", json=_body(1.0)), timeout=30)
        fixed = await asyncio.wait_for(client.post("/v2/models/triton_delay/infer", json=_body(1.0)), timeout=30)
        metrics = (await client.get("/metrics")).text
    assert alone.status_code == 200 and fixed.status_code == 200
    # Adaptive sent the lone request at once (a minute's delay was its bound); the opted-out model waited its
    # 2 ms delay out as Triton does, and says so.
    assert _reason_count(metrics, model="batched", reason="adaptive") == 1
    assert _reason_count(metrics, model="triton_delay", reason="delay") == 1
    assert _reason_count(metrics, model="triton_delay", reason="adaptive") == 0


async def test_a_request_the_predicted_run_would_make_late_gets_503_before_any_compute(repo):
    async with inprocess_server(repo, adaptive_batching=True, warmup=False) as (_, client):
        first = await client.post("/v2/models/slow/infer", json=_body(1.0, width=1, parameters={"timeout": 600_000_000}))
        assert first.status_code == 200, first.text  # one run teaches the planner what a run costs
        before = await _stats(client, "slow")
        late = await client.post("/v2/models/slow/infer", json=_body(1.0, width=1, parameters={"timeout": 50_000}))
        after = await _stats(client, "slow")
        ok = await client.post("/v2/models/slow/infer", json=_body(2.0, width=1, parameters={"timeout": 600_000_000}))
    assert late.status_code == 503, late.text
    error = late.json()["error"]
    assert "shed before running" in error and "queue timeout leaves" in error, error
    assert after["execution_count"] == before["execution_count"], "compute was spent on a request shed as late"
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    assert ok.status_code == 200, ok.text  # a request that can make it still runs


async def test_adaptive_waits_for_requests_whose_bodies_are_still_arriving(repo):
    """More requests in flight than queued: the batch waits for the ones still being read, not only the queued."""
    gate = asyncio.Event()
    payload = orjson.dumps(_body(3.0))

    async def slow_body():
        yield payload[:10]
        await gate.wait()
        yield payload[10:]

    async with inprocess_server(repo, adaptive_batching=True, warmup=False) as (server, client):
        batcher = server.core.model("batched").batcher
        headers = {"content-type": "application/json"}
        slow = [asyncio.ensure_future(client.post("/v2/models/batched/infer", content=slow_body(), headers=headers))
                for _ in range(3)]
        await until(lambda: batcher.arriving == 3, "three requests announced while their bodies arrive")
        whole = asyncio.ensure_future(client.post("/v2/models/batched/infer", json=_body(1.0)))
        await until(lambda: len(batcher.queue) == 1, "the whole request queued")  # and held for the three
        gate.set()
        answers = await asyncio.wait_for(asyncio.gather(whole, *slow), timeout=30)
        stats = await _stats(client, "batched")
    assert [r.status_code for r in answers] == [200] * 4
    assert answers[0].json()["outputs"][0]["data"] == [2.0] * 4
    assert all(r.json()["outputs"][0]["data"] == [6.0] * 4 for r in answers[1:])
    assert stats["inference_count"] == 4 and stats["execution_count"] == 1
    assert batcher.arriving == 0




@pytest.fixture
def unpinned(tmp_path: Path) -> Path:
    """Models with dynamic batching that do not choose a policy (the server's setting decides), and one that pins
    Triton's fixed delay for itself."""
    scale_model(tmp_path / "minute" / "1" / "model.onnx")
    write_config(tmp_path / "minute", f"max_batch_size: 4\ndynamic_batching {{ max_queue_delay_microseconds: {MINUTE_US} }}\n")
    scale_model(tmp_path / "short" / "1" / "model.onnx")
    write_config(tmp_path / "short", "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    scale_model(tmp_path / "pinned" / "1" / "model.onnx")
    write_config(tmp_path / "pinned", "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n"
                 + ADAPTIVE_OFF)
    return tmp_path


async def test_tritons_fixed_delay_stays_the_default(unpinned):
    # Round 4 measured adaptive as the default and kept it off (docs/BENCHMARKS.md "Adaptive by default? (round 4)").
    async with inprocess_server(unpinned, warmup=False) as (server, client):
        assert not server.core.model("short").batcher.adaptive
        resp = await asyncio.wait_for(client.post("/v2/models/short/infer", json=_body(1.0)), timeout=30)
        metrics = (await client.get("/metrics")).text
    assert resp.status_code == 200, resp.text
    assert _reason_count(metrics, model="short", reason="delay") == 1  # waited its 2 ms out alone, as Triton does
    assert _reason_count(metrics, model="short", reason="adaptive") == 0


async def test_adaptive_waits_shrink_to_nothing_for_a_lone_request_after_a_burst(unpinned):
    async with inprocess_server(unpinned, adaptive_batching=True, warmup=False) as (server, client):
        assert server.core.model("minute").batcher.adaptive
        # Four together fill a batch; the lone request after them is not held by the memory of that crowd.
        burst = await asyncio.wait_for(asyncio.gather(
            *(client.post("/v2/models/minute/infer", json=_body(float(i))) for i in range(4))), timeout=30)
        alone = await asyncio.wait_for(client.post("/v2/models/minute/infer", json=_body(5.0)), timeout=30)
        stats = await _stats(client, "minute")
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in burst] == [200] * 4 and alone.status_code == 200, alone.text
    assert alone.json()["outputs"][0]["data"] == [10.0] * 4
    assert stats["inference_count"] == 5 and stats["execution_count"] == 2
    # A minute's delay was only the bound: the lone request went because waiting did not pay, not because it ran out.
    assert _reason_count(metrics, model="minute", reason="full") == 1
    assert _reason_count(metrics, model="minute", reason="adaptive") == 1
    assert _reason_count(metrics, model="minute", reason="delay") == 0


def _infer_one(client: httpclient.InferenceServerClient, model: str) -> np.ndarray:
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    return client.infer(model, [x]).as_numpy("y")


def test_the_adaptive_batching_flag_in_a_real_server_and_a_models_own_fixed_pin(unpinned):
    with run_server(unpinned, extra_args=["--adaptive-batching", "true"]) as url:
        client = httpclient.InferenceServerClient(url)
        answers = [_infer_one(client, model) for model in ("short", "pinned")]
        metrics = httpx.get(f"http://{url}/metrics", timeout=10).text
    for y in answers:
        np.testing.assert_array_equal(y, np.full((1, 4), 2.0, np.float32))
    # The flag made the unpinned model adaptive; the model's own "false" kept Triton's delay under it.
    assert _reason_count(metrics, model="short", reason="adaptive") == 1
    assert _reason_count(metrics, model="short", reason="delay") == 0
    assert _reason_count(metrics, model="pinned", reason="delay") == 1
    assert _reason_count(metrics, model="pinned", reason="adaptive") == 0


async def test_an_adaptive_batching_value_other_than_true_or_false_is_a_clear_load_error(tmp_path: Path):
    scale_model(tmp_path / "typo" / "1" / "model.onnx")
    write_config(tmp_path / "typo", "max_batch_size: 4\ndynamic_batching { }\n"
                 'parameters { key: "adaptive_batching" value: { string_value: "ture" } }\n')
    async with inprocess_server(tmp_path, model_control_mode="explicit", strict_readiness=False,
                                warmup=False) as (_, client):
        resp = await client.post("/v2/repository/models/typo/load")
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert 'adaptive_batching must be "true" or "false"' in error and "'ture'" in error, error


def test_a_closed_loops_crowd_is_kept_across_the_silence_between_its_bursts():
    """Eight clients in a closed loop: each batch's answers send eight requests back 0.1 ms apart, then nothing
    arrives for 2.5 ms while that batch runs. The silence is 25 in-burst gaps but shorter than the loop's cycle, so
    the next burst's first request still counts the seven others as batch-mates to wait for (before, the crowd was
    forgotten every cycle and that request went alone: batches of 1 then 7)."""
    planner = Planner()
    t = cpu = 0.0
    for _ in range(6):  # six cycles: a burst of 8 arrivals, then the batch runs and ends
        for i in range(8):
            planner.observe_arrival(t, others=i)
            t += 0.0001
        t += 0.0025
        cpu += 0.0008 + 0.0001 * 8 + 0.0001 * (_ % 2)  # process CPU per batch: ~0.8 ms fixed, 0.1 ms a row
        planner.observe_batch(units=8 - _ % 2, wall_s=0.001, cpu_now=cpu, wall_now=t)
    first = t + 0.0001
    planner.observe_arrival(first, others=0)
    assert planner.crowd(0, now=first) == 7
    assert planner.plan(rows=1, others_in_flight=0, now=first, waited=0.0, remaining=0.003) > 0
    # A silence of several cycles still means the crowd has gone: a lone request is not held by it.
    later = first + 0.1
    planner.observe_arrival(later, others=0)
    assert planner.crowd(0, now=later) == 0
    assert planner.plan(rows=1, others_in_flight=0, now=later, waited=0.0, remaining=0.003) == 0.0
