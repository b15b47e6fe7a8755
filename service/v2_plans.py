"""Remembered V2 HTTP request headers: a binary request's JSON header is parsed and checked once per layout.

Clients send the same JSON header again and again (same input names, datatypes, shapes and output choices);
only the binary tail changes. The first request with a header goes through protocol_v2.decode_request (every
check, every error message); when it succeeds, the header's bytes map to a RequestPlan, and the next request
with exactly those bytes only wraps its tail in numpy views (no JSON parse, no per-field checks, no copy).

Only headers whose meaning does not depend on server state or on the request are remembered: every input in
the binary tail (no JSON `data`, no shared memory), no shared memory outputs, no request `id`, no BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from service.core import InferRequest, RequestedOutput
from service.protocol_v2 import OutputEncoding, decode_request
from service.shm import SharedMemoryRegistry

# Distinct headers remembered per server; past this the table starts over (a client cycling through many
# shapes costs one JSON parse per request, as without plans).
MAX_PLANS = 256
_UNCACHEABLE = (b'"id"', b"shared_memory")


@dataclass(frozen=True)
class _PlannedInput:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    count: int  # elements
    nbytes: int


@dataclass(frozen=True)
class RequestPlan:
    """What a remembered header says: where each input lies in the tail, which outputs, which encoding."""

    inputs: tuple[_PlannedInput, ...]
    outputs: tuple[tuple[str, int], ...] | None  # (name, classification count) when the client names outputs
    binary_default: bool
    per_output: tuple[tuple[str, bool], ...]
    parameters: dict
    tail_bytes: int

    def request(self, body: bytes, *, header_length: int, model_name: str,
                model_version: str | None) -> tuple[InferRequest, OutputEncoding] | None:
        """The request for `body` (views on its tail); None when the tail's size does not match (the caller
        then decodes it the long way, which says what is wrong)."""
        if len(body) - header_length != self.tail_bytes:
            return None
        inputs = {}
        offset = header_length
        for p in self.inputs:
            # One array straight on the body's bytes (read-only, no copy), not frombuffer's and then reshape's.
            inputs[p.name] = np.ndarray(p.shape, dtype=p.dtype, buffer=body, offset=offset)
            offset += p.nbytes
        outputs = None if self.outputs is None else [RequestedOutput(n, c) for n, c in self.outputs]
        req = InferRequest(model_name=model_name, model_version=model_version, inputs=inputs, outputs=outputs,
                           parameters=dict(self.parameters))
        return req, OutputEncoding(default=self.binary_default, per_output=dict(self.per_output))


def _plan(doc: dict, req: InferRequest, encoding: OutputEncoding, *, tail_bytes: int) -> RequestPlan | None:
    raw_inputs = doc.get("inputs") or []
    for inp in raw_inputs:
        params = inp.get("parameters") or {}
        if "data" in inp or "binary_data_size" not in params:
            return None
    planned = []
    for name, arr in req.inputs.items():
        if arr.dtype == object or arr.size == 0:
            return None
        planned.append(_PlannedInput(name, arr.dtype, arr.shape, arr.size, arr.nbytes))
    if sum(p.nbytes for p in planned) != tail_bytes:
        return None
    outputs = None if req.outputs is None else tuple((o.name, o.class_count) for o in req.outputs)
    return RequestPlan(inputs=tuple(planned), outputs=outputs, binary_default=encoding.default,
                       per_output=tuple(encoding.per_output.items()), parameters=dict(req.parameters),
                       tail_bytes=tail_bytes)


class RequestPlans:
    """Header bytes -> RequestPlan, for one server (its byte limit was checked when the plan was made)."""

    def __init__(self) -> None:
        self._plans: dict[bytes, RequestPlan] = {}

    def get(self, body: bytes, header_length: int) -> RequestPlan | None:
        return self._plans.get(body[:header_length])

    def decode(self, body: bytes, *, header_length: int | None, model_name: str, model_version: str | None,
               max_tensor_bytes: int, shm: SharedMemoryRegistry | None) -> tuple[InferRequest, OutputEncoding]:
        """A JSON (+ binary) request: through a learned plan when its header was seen before, else decoded in
        full (protocol_v2.decode_request) and its header learned for next time."""
        if header_length is not None and 0 < header_length <= len(body):
            plan = self.get(body, header_length)
            if plan is not None:
                planned = plan.request(body, header_length=header_length, model_name=model_name,
                                       model_version=model_version)
                if planned is not None:
                    return planned
        req, encoding = decode_request(body, header_length=header_length, model_name=model_name,
                                       model_version=model_version, max_tensor_bytes=max_tensor_bytes, shm=shm)
        if header_length is not None and 0 < header_length < len(body):
            self.learn(body, header_length=header_length, req=req, encoding=encoding)
        return req, encoding

    def learn(self, body: bytes, *, header_length: int, req: InferRequest, encoding: OutputEncoding) -> None:
        """Remember the header of a request that decoded cleanly, when its meaning is the same every time."""
        header = body[:header_length]
        if any(marker in header for marker in _UNCACHEABLE):
            return
        plan = _plan(orjson.loads(header), req, encoding, tail_bytes=len(body) - header_length)
        if plan is None:
            return
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[header] = plan
