"""Adaptive and length-aware batching: the planner's decisions, early shedding, dispatch metrics, padded batches.

Clocks are passed in (a frozen fake clock where the planner's arithmetic decides), and waits that matter are a
minute long, so a batch that forms did so because of the decision under test, never because of timing.
"""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.batch_planner import DispatchReason, Planner
from service.batcher import Batcher, BatcherStats
from service.errors import DeadlineExceeded, ModelLoadError
from service.modelrepo.config import BatchingPolicy
from service.ragged import RaggedPolicy
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model, write_config
from tests.test_batcher import HUGE_DELAY_US, GatedModel, submit, until


class FrozenClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def adaptive_batcher(model, *, clock, max_batch_size=4, reasons=None, ragged=None, preferred=()):
    policy = BatchingPolicy(max_queue_delay_us=HUGE_DELAY_US, preferred_batch_sizes=tuple(preferred))
    stats = BatcherStats(on_dispatch=lambda reason, rows: reasons.append((reason, rows))) if reasons is not None \
        else BatcherStats()
    b = Batcher(model="m", run=model, executor=ThreadPoolExecutor(1), policy=policy, max_batch_size=max_batch_size,
                concurrency=1, clock=clock, stats=stats, adaptive=ragged is None, ragged=ragged)
    b.start()
    return b


def test_planner_waits_zero_when_alone_and_while_it_pays_in_a_burst():
    planner = Planner()
    assert planner.wait_s(rows=1, others_in_flight=0, now=0.0) == 0.0  # nothing learned, nobody else: go
    for t in (0.0, 0.001, 0.002):
        planner.arrivals.observe(t)
    planner.cost.observe(1, 0.005)  # only lone runs seen, slower than the arrivals: no gain was ever measured
    assert planner.wait_s(rows=1, others_in_flight=0, now=0.002) == 0.0
    planner = Planner()
    for rows, cost in [(1, 0.010), (8, 0.017), (1, 0.010), (8, 0.017)]:
        planner.cost.observe(rows, cost)
    a, b = planner.cost.fit()  # type: ignore[misc]
    assert a == pytest.approx(0.001) and b == pytest.approx(0.009)
    for t in (0.0, 1.0, 2.0):  # one arrival a second: nobody is coming soon
        planner.arrivals.observe(t)
    assert planner.wait_s(rows=1, others_in_flight=0, now=2.0) == 0.0
    assert planner.wait_s(rows=1, others_in_flight=3, now=2.0) == 0.0  # a 1 s gap is never worth 9 ms saved
    burst = Planner(cost=planner.cost)
    for t in (0.0, 0.0005, 0.0010, 0.0015):
        burst.arrivals.observe(t)
    assert burst.wait_s(rows=1, others_in_flight=0, now=0.0015) > 0  # a 0.5 ms gap saves 9 ms: wait
    assert burst.wait_s(rows=30, others_in_flight=0, now=0.0015) == 0.0  # 30 rows x 0.5 ms > 9 ms: go
    # Having waited 8.8 ms already, one more 0.5 ms gap would cost more than the 9 ms a shared run saves.
    assert burst.wait_s(rows=1, others_in_flight=4, now=0.0015, waited=0.0088) == 0.0


async def test_a_lone_request_does_not_wait_out_the_delay():
    model, reasons = GatedModel(), []
    b = adaptive_batcher(model, clock=FrozenClock(), reasons=reasons)
    result = await asyncio.wait_for(submit(b, 1.0), timeout=10)  # the delay is a minute
    np.testing.assert_array_equal(result.outputs["y"], np.full((1, 3), 2.0))
    assert reasons == [(DispatchReason.ADAPTIVE, 1)]
    await b.close(grace_s=1)


async def test_a_burst_still_forms_a_full_batch():
    model, reasons, clock = GatedModel(), [], FrozenClock()
    b = adaptive_batcher(model, clock=clock, reasons=reasons)
    for rows in (1, 4):
        b.planner.cost.observe(rows, 1.0)  # one second a run, whatever its size: batching saves a lot
    for _ in range(3):
        b.planner.arrivals.observe(clock.now)  # arrivals with no gap between them: a burst
    first = submit(b, 1.0)
    for _ in range(50):  # give the collector every chance to send the first request alone
        await asyncio.sleep(0)
    assert not model.batches
    rest = [submit(b, v) for v in (2.0, 3.0, 4.0)]
    await asyncio.wait_for(asyncio.gather(first, *rest), timeout=10)
    assert [len(x) for x in model.batches] == [4]
    assert reasons == [(DispatchReason.FULL, 4)]
    await b.close(grace_s=1)


async def test_a_request_whose_deadline_cannot_be_met_is_shed_before_running():
    model, clock = GatedModel(), FrozenClock()
    b = adaptive_batcher(model, clock=clock)
    b.planner.cost.observe(1, 2.0)  # a run takes two seconds
    late = submit(b, 1.0, timeout_s=0.5)
    with pytest.raises(DeadlineExceeded, match=r"shed before running.*predicted to take 2000\.0 ms") as err:
        await asyncio.wait_for(late, timeout=10)
    assert err.value.status_code == 503  # Triton's UNAVAILABLE "Request timeout expired"
    assert not model.batches  # no compute spent on it
    clock.now += 100  # the next caller comes much later: no burst to wait for
    ok = await asyncio.wait_for(submit(b, 3.0, timeout_s=30), timeout=10)
    np.testing.assert_array_equal(ok.outputs["y"], np.full((1, 3), 6.0))
    await b.close(grace_s=1)


def masked_run(feeds):
    """A model that masks: per-row mean of the real tokens, and per-token doubling."""
    ids, mask = feeds["input_ids"].astype(np.float32), feeds["attention_mask"].astype(np.float32)
    mean = (ids * mask).sum(axis=1, keepdims=True) / mask.sum(axis=1, keepdims=True)
    return {"mean": mean, "tokens": ids * 2}, 0, 0


def tokens(values):
    ids = np.array([values], np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


async def test_length_aware_batches_group_similar_lengths_pad_and_cut_back():
    seen = []

    def run(feeds):
        seen.append(feeds["input_ids"].shape)
        return masked_run(feeds)

    ragged = RaggedPolicy(pad_values={"input_ids": 0, "attention_mask": 0}, outputs=("tokens",))
    b = adaptive_batcher(run, clock=FrozenClock(), max_batch_size=2, ragged=ragged, preferred=[2])
    lengths = [3, 9, 2, 8]
    futs = [b.submit(inputs=tokens(list(range(1, n + 1))), rows=1, timeout_s=None) for n in lengths]
    results = await asyncio.wait_for(asyncio.gather(*futs), timeout=10)
    assert sorted(seen) == [(2, 3), (2, 9)]  # {3, 2} padded to 3 and {9, 8} padded to 9, not 4 rows of 9
    for n, r in zip(lengths, results):
        alone, _, _ = masked_run(tokens(list(range(1, n + 1))))
        np.testing.assert_allclose(r.outputs["mean"], alone["mean"], atol=1e-5)
        np.testing.assert_array_equal(r.outputs["tokens"], alone["tokens"])  # cut back to its own length
    await b.close(grace_s=1)


async def test_length_aware_batches_keep_the_token_bound():
    seen = []

    def run(feeds):
        seen.append(feeds["input_ids"].shape)
        return masked_run(feeds)

    ragged = RaggedPolicy(pad_values={"input_ids": 0, "attention_mask": 0}, max_tokens=20)
    b = adaptive_batcher(run, clock=FrozenClock(), max_batch_size=4, ragged=ragged, preferred=[4])
    b.accepting = True
    futs = [b.submit(inputs=tokens([1] * 10), rows=1, timeout_s=None) for _ in range(4)]
    await until(lambda: len(seen) >= 1, "first batch ran")
    assert seen[0] == (2, 10)  # 2 x 10 tokens fit the bound of 20; a third row would not
    for f in futs:
        f.cancel()
    await b.close(grace_s=1)


class TickingClock:
    """Moves 1 ms each time it is read: waits end by the planner's arithmetic, never by a real timer."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


async def test_adaptive_length_aware_batches_take_a_request_only_if_its_padding_costs_less_than_a_run():
    seen = []

    def run(feeds):
        seen.append(feeds["input_ids"].shape)
        return masked_run(feeds)

    ragged = RaggedPolicy(pad_values={"input_ids": 0, "attention_mask": 0})
    policy = BatchingPolicy(max_queue_delay_us=HUGE_DELAY_US)
    b = Batcher(model="m", run=run, executor=ThreadPoolExecutor(1), policy=policy, max_batch_size=4, concurrency=1,
                clock=TickingClock(), adaptive=True, ragged=ragged)
    for tokens_, seconds in [(10, 0.015), (20, 0.025)]:
        b.planner.cost.observe(tokens_, seconds)  # 1 ms a token plus 5 ms a run: 5 padding tokens are worth a run
    assert Planner().max_padding() == 0.0  # nothing learned: equal lengths only
    assert b.planner.max_padding() == pytest.approx(5.0)
    b.start()
    futs = [b.submit(inputs=tokens(list(range(1, n + 1))), rows=1, timeout_s=None) for n in (10, 12, 30)]
    await asyncio.wait_for(asyncio.gather(*futs), timeout=10)
    assert seen == [(2, 12), (1, 30)]  # 10 pads by 2 to join 12; 30 would pad the others by 36: it runs alone
    await b.close(grace_s=1)


def masked_mean_model(path: Path) -> Path:
    """ONNX: mean = sum(ids * mask) / sum(mask) per row (FP32 [n, 1]), tokens = ids * 2 (FP32 [n, L])."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "L"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["n", "L"])
    mean = helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["n", 1])
    toks = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["n", "L"])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["idf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["idf", "mf"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["total"], keepdims=1),
        helper.make_node("ReduceSum", ["mf", "axes"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("Mul", ["idf", "two"], ["tokens"]),
    ]
    init = [helper.make_tensor("axes", TensorProto.INT64, [1], [1]), helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
    graph = helper.make_graph(nodes, "masked_mean", [ids, mask], [mean, toks], initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


RAGGED_CONFIG = """max_batch_size: 8
input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "mean" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "tokens" data_type: TYPE_FP32 dims: [ -1 ] } ]
dynamic_batching { preferred_batch_size: [ 3 ] max_queue_delay_microseconds: 60000000 }
parameters { key: "ragged_batching" value: { string_value: "pad" } }
parameters { key: "ragged_pad_values" value: { string_value: "input_ids:0,attention_mask:0" } }
"""


def v2_tokens(values: list[int]) -> dict:
    n = len(values)
    return {"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, n], "data": values},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, n], "data": [1] * n},
    ]}


async def test_server_pads_requests_of_different_lengths_into_one_onnx_batch(tmp_path):
    masked_mean_model(tmp_path / "masked" / "1" / "model.onnx")
    write_config(tmp_path / "masked", RAGGED_CONFIG)
    async with inprocess_server(tmp_path) as (_, client):
        bodies = [v2_tokens([5, 6]), v2_tokens(list(range(1, 12))), v2_tokens([7, 8, 9, 10])]
        responses = await asyncio.gather(*(client.post("/v2/models/masked/infer", json=b) for b in bodies))
        stats = (await client.get("/v2/models/masked/stats")).json()["model_stats"][0]
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    assert stats["execution_count"] == 1 and stats["inference_count"] == 3  # one padded run for all three
    for body, resp in zip(bodies, responses):
        values = body["inputs"][0]["data"]
        out = {o["name"]: o for o in resp.json()["outputs"]}
        assert out["mean"]["data"] == pytest.approx([sum(values) / len(values)], abs=1e-5)
        assert out["tokens"]["shape"] == [1, len(values)] and out["tokens"]["data"] == [2.0 * v for v in values]
    assert 'modelserve_batch_fill_ratio_count{model="masked",reason="preferred",version="1"} 1' in metrics


async def test_a_bad_ragged_declaration_fails_the_load_with_what_is_expected(tmp_path):
    masked_mean_model(tmp_path / "masked" / "1" / "model.onnx")
    write_config(tmp_path / "masked", RAGGED_CONFIG.replace("input_ids:0,attention_mask:0", "input_ids:zero"))
    async with inprocess_server(tmp_path, strict_readiness=False) as (_, client):
        index = (await client.post("/v2/repository/index", json={})).json()
    assert index[0]["state"] == "UNAVAILABLE" and "expected NAME:NUMBER" in index[0]["reason"]
    assert ModelLoadError.status_code >= 400


async def test_dispatch_reason_and_fill_are_metrics(tmp_path):
    scale_model(tmp_path / "batched" / "1" / "model.onnx")
    write_config(tmp_path / "batched", "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 60000000 }\n")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1.0] * 8}]}
    async with inprocess_server(tmp_path, adaptive_batching=True) as (_, client):
        resp = await asyncio.wait_for(client.post("/v2/models/batched/infer", json=body), timeout=30)
        metrics = (await client.get("/metrics")).text
    assert resp.status_code == 200  # alone: sent at once, not after the minute's delay
    labels = 'model="batched",reason="adaptive",version="1"'
    assert f"modelserve_batch_fill_ratio_count{{{labels}}} 1" in metrics  # one batch, sent for this reason
    assert f'modelserve_batch_fill_ratio_bucket{{le="0.25",{labels}}} 1' in metrics
    assert f"modelserve_batch_fill_ratio_sum{{{labels}}} 0.25" in metrics


@pytest.fixture(scope="module")
def tiny_transformer(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session zoo's transformer model (its config declares ragged padding), copied to re-time its batching."""
    repo = tmp_path_factory.mktemp("tiny_transformer") / "model_repository"
    shutil.copytree(tiny_zoo / "transformer", repo / "transformer")
    config = repo / "transformer" / "config.pbtxt"
    text = config.read_text()
    assert 'key: "ragged_batching"' in text
    # Three texts form a batch at once; one alone waits the (short) delay: batching decided by size, not timing.
    config.write_text(text.replace("preferred_batch_size: [ 16, 32 ] max_queue_delay_microseconds: 500",
                                   "preferred_batch_size: [ 3 ] max_queue_delay_microseconds: 200000"))
    return repo


async def test_zoo_transformer_embeddings_equal_alone_or_padded_with_longer_texts(tiny_transformer):
    short = "a short docstring"
    longer = ["return the list of items sorted by key, with ties broken by insertion order " * 3,
              "open the file at path and yield its lines without the trailing newline"]
    async with inprocess_server(tiny_transformer, load_model=["transformer"], model_control_mode="explicit") \
            as (_, client):
        alone = await client.post("/v1/models/transformer/predict", json={"texts": [short]})
        # Three callers, three lengths: without length-aware batching their shapes differ and never stack.
        together = await asyncio.gather(*(client.post("/v1/models/transformer/predict", json={"texts": [t]})
                                          for t in [short, *longer]))
        stats = (await client.get("/v2/models/transformer/stats")).json()["model_stats"][0]
    assert alone.status_code == 200 and [r.status_code for r in together] == [200] * 3, alone.text
    solo, mixed = alone.json()["results"][0], [r.json()["results"][0] for r in together]
    assert mixed[0]["tokens_used"] < mixed[1]["tokens_used"]  # really padded next to a longer text
    np.testing.assert_allclose(mixed[0]["embedding"], solo["embedding"], atol=1e-5)
    assert {b["batch_size"] for b in stats["batch_stats"]} == {1, 3}  # one padded run held all three callers' texts
