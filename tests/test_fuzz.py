"""Hypothesis fuzzing of the V2 JSON and binary codecs and of gRPC requests: no input gets a 5xx, UNKNOWN or
INTERNAL. The real Server runs in-process on its own event loop in a thread (hypothesis drives plain
functions); HTTP goes through httpx's ASGI transport, gRPC through a real channel on a loopback port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from service.grpc_app import start_grpc_server
from tests.conftest import free_port
from tests.inprocess import inprocess_server
from tests.onnx_builders import gather_model, scale_model, string_model, write_config

EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODELS = ["scale", "strings", "gather", "nope"]
DATATYPES = ["FP32", "FP16", "INT64", "INT8", "UINT64", "BOOL", "BYTES", "FP64", "BF16", "XYZ", ""]


class Background:
    """The in-process server on an event loop in a daemon thread; `call` runs a coroutine there."""

    def __init__(self, repo: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.port = free_port()
        threading.Thread(target=self.loop.run_until_complete, args=(self._main(repo),), daemon=True).start()
        assert self.ready.wait(120), "in-process server did not start"

    async def _main(self, repo: Path) -> None:
        async with inprocess_server(repo) as (server, client):
            self.client = client
            grpc_server = await start_grpc_server(server.core, host="127.0.0.1", port=self.port,
                                                  max_message_bytes=4 * 1024 * 1024)
            self.ready.set()
            await self.stop.wait()
            await grpc_server.stop(grace=None)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)


@pytest.fixture(scope="module")
def bg(tmp_path_factory) -> Iterator[Background]:
    root = tmp_path_factory.mktemp("fuzz") / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    string_model(root / "strings" / "1" / "model.onnx")
    gather_model(root / "gather" / "1" / "model.onnx")
    server = Background(root)
    yield server
    server.close()


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1), st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                                 st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                           max_leaves=12)
shapes = st.one_of(st.lists(st.integers(min_value=-3, max_value=2**63 - 1), max_size=5),
                   st.lists(st.integers(min_value=0, max_value=6), max_size=3), json_values)
inputs = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "idx", "y", ""]), "shape": shapes, "datatype": st.sampled_from(DATATYPES)},
    optional={"data": json_values, "parameters": json_values},
)
requests = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(inputs, max_size=3), json_values)},
    optional={"outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": st.sampled_from(["y", "z"])},
                                                                  optional={"parameters": json_values}), max_size=2),
                                   json_values),
              "parameters": json_values, "id": json_values},
)


@EXAMPLES
@given(model=st.sampled_from(MODELS), doc=requests)
def test_json_requests_never_5xx(bg, model, doc):
    resp = bg.call(bg.client.post(f"/v2/models/{model}/infer", content=orjson.dumps(doc)))
    assert resp.status_code < 500, (doc, resp.text)


@EXAMPLES
@given(model=st.sampled_from(MODELS), doc=requests, tail=st.binary(max_size=64),
       header_length=st.one_of(st.none(), st.integers(min_value=-5, max_value=400),
                               st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4)),
       sizes=st.lists(st.integers(min_value=-2, max_value=80), max_size=3))
def test_binary_requests_never_5xx(bg, model, doc, tail, header_length, sizes):
    tensors = [i for i in doc["inputs"] if isinstance(i, dict)] if isinstance(doc["inputs"], list) else []
    for inp, size in zip(tensors, sizes):
        inp["parameters"] = {"binary_data_size": size}
    header = orjson.dumps(doc)
    length = str(len(header) if header_length is None else header_length)
    resp = bg.call(bg.client.post(f"/v2/models/{model}/infer", content=header + tail,
                                  headers={"Inference-Header-Content-Length": length}))
    assert resp.status_code < 500, (doc, resp.text)


def _grpc_request(model: str, tensors: list, raw: list[bytes], classification: object) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, values in tensors:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        t.contents.int64_contents.extend(values)
        t.contents.fp32_contents.extend(float(v) for v in values)
    req.raw_input_contents.extend(raw)
    out = req.outputs.add(name="y")
    if isinstance(classification, int):
        out.parameters["classification"].int64_param = classification
    elif isinstance(classification, str):
        out.parameters["classification"].string_param = classification
    return req.SerializeToString()


grpc_tensors = st.lists(st.tuples(st.sampled_from(["x", "idx", ""]), st.sampled_from(DATATYPES),
                                  st.lists(st.integers(min_value=-2, max_value=2**63 - 1), max_size=4),
                                  st.lists(st.integers(min_value=-2**63, max_value=2**63 - 1), max_size=6)),
                        max_size=3)


@EXAMPLES
@given(model=st.sampled_from(MODELS), tensors=grpc_tensors, raw=st.lists(st.binary(max_size=40), max_size=3),
       classification=st.one_of(st.none(), st.integers(min_value=-2**63, max_value=2**63 - 1), st.text(max_size=4)),
       garbage=st.one_of(st.none(), st.binary(max_size=64)))
def test_grpc_requests_never_unknown_or_internal(bg, model, tensors, raw, classification, garbage):
    payload = garbage if garbage is not None else _grpc_request(model, tensors, raw, classification)

    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{bg.port}") as channel:
            try:
                await channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(payload, timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    code = bg.call(call())
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), payload[:80]
