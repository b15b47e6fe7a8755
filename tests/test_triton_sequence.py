"""Sequence batching and implicit state as Triton's clients use them: sequence_id / sequence_start /
sequence_end through the real tritonclient (HTTP, HTTP aio, gRPC, gRPC aio) against a real server process,
on Triton's example models rebuilt in ONNX (tests/triton_sequence_models.py)."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server
from tests.inprocess import inprocess_server
from tests.triton_sequence_models import accumulator, sequence_repository

START_MSG = "must specify the START flag on the first request of the sequence"
CORRID_MSG = "must specify a non-zero or non-empty correlation ID"
VALUES = [11, 7, 5, 3, 2, 0, 1]


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    repo = sequence_repository(tmp_path_factory.mktemp("seq") / "models")
    grpc_port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(grpc_port)]) as url:
        yield url, f"127.0.0.1:{grpc_port}"


def _inputs(module, value: int) -> list:
    inp = module.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.full((1, 1), value, dtype=np.int32))
    return [inp]


def _run_sequence(client, module, *, model: str, sid, values: list[int]) -> list[int]:
    out = []
    for i, v in enumerate(values):
        result = client.infer(model, _inputs(module, v), sequence_id=sid, sequence_start=i == 0,
                              sequence_end=i == len(values) - 1)
        out.append(int(result.as_numpy("OUTPUT")[0][0]))
    return out


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_triton_example_sequences(urls, module):
    """What NVIDIA's simple_*_sequence_sync_infer_client checks: OUTPUT = INPUT + START on simple_sequence,
    plus CORRID on the END request for simple_dyna_sequence, and an accumulator with a decimal string id."""
    url = urls[0] if module is httpclient else urls[1]
    client = module.InferenceServerClient(url)
    assert _run_sequence(client, module, model="simple_sequence", sid=1000, values=[0, *VALUES]) == [1, *VALUES]
    neg = [-v for v in VALUES]
    assert _run_sequence(client, module, model="simple_sequence", sid="a-uuid", values=[20, *neg]) == [21, *neg]
    dyna = _run_sequence(client, module, model="simple_dyna_sequence", sid=1001, values=[100, *neg])
    assert dyna == [101, *neg[:-1], neg[-1] + 1001]
    acc = _run_sequence(client, module, model="simple_string_dyna_sequence", sid="1002", values=[20, *neg])
    assert acc == [*np.cumsum([20, *neg])[:-1].tolist(), 20 + sum(neg) + 1002]
    client.close()


@pytest.mark.parametrize("model", ["acc_direct", "acc_oldest"])
async def test_interleaved_sequences_keep_their_own_state_grpc_aio(urls, model):
    """Eight sequences at once: each one's steps run in order with its own state, batched together."""
    client = grpcaio.InferenceServerClient(urls[1])

    async def sequence(sid: int) -> list[int]:
        out = []
        for i in range(5):
            r = await client.infer(model, _inputs(grpcaio, sid * 10 + i), sequence_id=sid,
                                   sequence_start=i == 0, sequence_end=i == 4)
            out.append(int(r.as_numpy("OUTPUT")[0][0]))
        return out

    results = await asyncio.gather(*(sequence(sid) for sid in range(1, 9)))
    for sid, got in zip(range(1, 9), results):
        assert got == np.cumsum([sid * 10 + i for i in range(5)]).tolist()
    stats = await client.get_inference_statistics(model, as_json=True)
    assert int(stats["model_stats"][0]["inference_count"]) == 40
    await client.close()


async def test_more_sequences_than_slots_wait_for_a_free_slot_http_aio(urls):
    """max_batch_size 8 gives 8 slots: a ninth sequence waits in the backlog and runs once one ends."""
    client = httpaio.InferenceServerClient(urls[0])
    for sid in range(101, 109):
        await client.infer("acc_direct", _inputs(httpaio, 1), sequence_id=sid, sequence_start=True)
    ninth = asyncio.ensure_future(client.infer("acc_direct", _inputs(httpaio, 5), sequence_id=200,
                                               sequence_start=True, sequence_end=True))
    await client.infer("acc_direct", _inputs(httpaio, 1), sequence_id=101, sequence_end=True)
    assert int((await ninth).as_numpy("OUTPUT")[0][0]) == 5
    for sid in range(102, 109):
        r = await client.infer("acc_direct", _inputs(httpaio, 2), sequence_id=sid, sequence_end=True)
        assert int(r.as_numpy("OUTPUT")[0][0]) == 3
    await client.close()


def test_restart_resets_state_and_ended_sequence_needs_start_http(urls):
    client = httpclient.InferenceServerClient(urls[0])
    assert _run_sequence(client, httpclient, model="acc_direct", sid=7, values=[5, 6]) == [5, 11]
    with pytest.raises(InferenceServerException) as err:
        client.infer("acc_direct", _inputs(httpclient, 1), sequence_id=7)
    assert err.value.status() == "400" and START_MSG in err.value.message()
    assert "sequence 7 to model 'acc_direct'" in err.value.message()
    client.infer("acc_direct", _inputs(httpclient, 4), sequence_id=8, sequence_start=True)
    client.infer("acc_direct", _inputs(httpclient, 4), sequence_id=8)
    restarted = client.infer("acc_direct", _inputs(httpclient, 3), sequence_id=8, sequence_start=True)
    assert int(restarted.as_numpy("OUTPUT")[0][0]) == 3  # a new START begins from the zero state
    client.close()


def test_errors_use_tritons_wording_grpc(urls):
    client = grpcclient.InferenceServerClient(urls[1])
    cases = [
        (dict(sequence_id=99), START_MSG),
        (dict(), CORRID_MSG),
        (dict(sequence_id=5, sequence_start=True, sequence_end=True), "batch size 1"),
    ]
    for kwargs, message in cases:
        data = _inputs(grpcclient, 1)
        if "sequence_end" in kwargs:
            data[0] = grpcclient.InferInput("INPUT", [2, 1], "INT32")
            data[0].set_data_from_numpy(np.ones((2, 1), np.int32))
        with pytest.raises(InferenceServerException) as err:
            client.infer("acc_direct", data, **kwargs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and message in err.value.message()
    with pytest.raises(InferenceServerException) as err:  # integer CORRID needs a decimal string id
        client.infer("simple_dyna_sequence", _inputs(grpcclient, 1), sequence_id="abc", sequence_start=True)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "decimal" in err.value.message()
    client.close()


async def _until(condition, *, timeout: float = 10.0) -> None:
    """Poll `condition` inside the event loop (the idle timer must be able to fire meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        await asyncio.sleep(0.02)


async def test_idle_sequence_is_released_with_its_state(tmp_path):
    root = tmp_path / "models"
    accumulator(root, name="acc_idle", idle_us=100_000)
    port = free_port()
    async with inprocess_server(root, grpc_port=port) as (server, _):
        client = grpcaio.InferenceServerClient(f"127.0.0.1:{port}")
        await client.infer("acc_idle", _inputs(grpcaio, 3), sequence_id=42, sequence_start=True)
        sequencer = server.core.model("acc_idle").sequencer
        assert sequencer is not None and 42 in sequencer.sequences
        await _until(lambda: 42 not in sequencer.sequences)
        with pytest.raises(InferenceServerException) as err:
            await client.infer("acc_idle", _inputs(grpcaio, 1), sequence_id=42)
        assert START_MSG in err.value.message() and err.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        await client.close()
