"""Closed-loop gRPC load (KServe V2 ModelInfer, raw_input_contents), the gRPC twin of generator.run_level.

Requests are serialized once before the run and sent as bytes over one grpc.aio channel per worker (as
aiohttp keeps one connection per worker), so the client spends its CPU on gRPC itself; responses are parsed
with the protobuf classes tritonclient ships and checked for every output and the row count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from loadtests.payloads import EncodedRequest, ModelInfo

METHOD = "/inference.GRPCInferenceService/ModelInfer"
# The bench's tensors are small; 64 MiB leaves room for any model the generator is pointed at.
_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _identity(data: bytes) -> bytes:
    return data


def encode_grpc(inputs: dict[str, np.ndarray], *, info: ModelInfo, model: str,
                version: str | None) -> EncodedRequest:
    """One serialized ModelInferRequest with raw contents; outputs are not named (the server sends all)."""
    req = pb.ModelInferRequest(model_name=model, model_version=version or "")
    for t in info.inputs:
        arr = inputs[t.name]
        if t.datatype == "BYTES":
            raise ValueError(f"input {t.name!r}: the gRPC load generator sends fixed-size datatypes only")
        req.inputs.add(name=t.name, datatype=t.datatype, shape=list(arr.shape))
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    rows = next(iter(inputs.values())).shape[0] if info.batched else 1
    return EncodedRequest(req.SerializeToString(), {}, rows)


def check_grpc_response(body: bytes, *, info: ModelInfo, rows: int) -> str | None:
    """None when the response carries every output (raw contents, right row count); else what is wrong."""
    try:
        resp = pb.ModelInferResponse.FromString(body)
    except Exception as exc:  # protobuf's DecodeError
        return f"unreadable response: {exc!r}"
    names = {o.name: o for o in resp.outputs}
    missing = [o.name for o in info.outputs if o.name not in names]
    if missing:
        return f"response lacks output(s) {missing}"
    if len(resp.raw_output_contents) != len(resp.outputs):
        return f"{len(resp.raw_output_contents)} raw_output_contents for {len(resp.outputs)} outputs"
    for o in resp.outputs:
        if info.batched and list(o.shape[:1]) != [rows]:
            return f"output {o.name!r} has shape {list(o.shape)}, expected {rows} row(s)"
    return None


def open_channels(address: str, count: int) -> list[grpc.aio.Channel]:
    return [grpc.aio.insecure_channel(address, options=_OPTIONS) for _ in range(count)]


async def close_channels(channels: list[grpc.aio.Channel]) -> None:
    await asyncio.gather(*(c.close() for c in channels))


async def run_grpc_level(channels: list[grpc.aio.Channel], *, info: ModelInfo, bodies: list[EncodedRequest],
                         result, time_cap_s: float, timeout_s: float,
                         on_done: Callable[[], None] | None = None) -> None:
    """Send result.requested ModelInfer calls, one worker per channel (result: a generator.LevelResult)."""
    loop = asyncio.get_running_loop()
    issued = 0
    deadline = loop.time() + time_cap_s

    async def worker(channel: grpc.aio.Channel) -> None:
        nonlocal issued
        call = channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)
        while issued < result.requested:
            if loop.time() >= deadline:
                result.time_capped = True
                return
            req = bodies[issued % len(bodies)]
            issued += 1
            t0 = time.perf_counter()
            try:
                body = await call(req.body, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                result.record_error(f"gRPC {exc.code().name}", exc.details() or "")
                continue
            latency = time.perf_counter() - t0
            problem = check_grpc_response(body, info=info, rows=req.rows)
            if problem is not None:
                result.record_error("bad response", problem)
                continue
            result.ok += 1
            result.latencies_s.append(latency)
            if on_done is not None:
                on_done()

    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in channels))
    finally:
        result.elapsed_s = time.perf_counter() - t0
        result.client_cpu_s = time.process_time() - cpu0
