"""Bodies of the frames between front ends and the model process (service/frontend_link.py).

The common request and response (numeric tensors, no shared memory, no trace) go as an orjson header plus the
tensors' raw bytes, read back as NumPy views of the frame; anything else as pickle.
NOTE: hand-written because pickle took 20-30 us per InferRequest or InferResponse each way (a 1x1x28x28 input,
timeit at load 8): ~100 us per request over the two processes, half a tiny model's whole budget.
"""

from __future__ import annotations

import math
import pickle
import struct
from typing import Any

import numpy as np
import orjson

from service.core import InferRequest, InferResponse, OutputTensor, RequestedOutput

_PICKLED, _PACKED = b"P", b"T"
_HEAD = struct.Struct("<I")
_NUMERIC = frozenset("biuf")


def _numeric(arrays: Any) -> bool:
    return all(a.dtype.kind in _NUMERIC for a in arrays)


def _pack(meta: dict, arrays: list[np.ndarray]) -> bytes | None:
    try:
        head = orjson.dumps(meta)
    except TypeError:  # a parameter orjson cannot write: pickle instead
        return None
    return b"".join([_PACKED, _HEAD.pack(len(head)), head, *(np.ascontiguousarray(a).data for a in arrays)])


def _unpack(payload: bytes, specs: list[list]) -> list[np.ndarray]:
    """Arrays for [name, dtype, shape] specs, as views of `payload` from the end of the header."""
    pos = 1 + _HEAD.size + _HEAD.unpack_from(payload, 1)[0]
    arrays = []
    for _, dtype, shape in specs:
        dt, count = np.dtype(dtype), math.prod(shape)
        arrays.append(np.frombuffer(payload, dt, count=count, offset=pos).reshape(shape))
        pos += dt.itemsize * count
    return arrays


def _meta(payload: bytes) -> dict:
    size = _HEAD.unpack_from(payload, 1)[0]
    return orjson.loads(memoryview(payload)[1 + _HEAD.size:1 + _HEAD.size + size])


def dump_request(req: InferRequest) -> bytes:
    plain = req.trace is None and _numeric(req.inputs.values()) and all(o.shm is None for o in req.outputs or [])
    if plain:
        meta = {"m": req.model_name, "v": req.model_version, "id": req.id, "p": req.parameters,
                "o": None if req.outputs is None else [[o.name, o.class_count] for o in req.outputs],
                "i": [[name, a.dtype.str, a.shape] for name, a in req.inputs.items()]}
        packed = _pack(meta, list(req.inputs.values()))
        if packed is not None:
            return packed
    return _PICKLED + pickle.dumps(req, protocol=5)


def load_request(payload: bytes) -> InferRequest:
    if payload[:1] == _PICKLED:
        return pickle.loads(memoryview(payload)[1:])
    meta = _meta(payload)
    arrays = _unpack(payload, meta["i"])
    outputs = None if meta["o"] is None else [RequestedOutput(name, count) for name, count in meta["o"]]
    return InferRequest(model_name=meta["m"], model_version=meta["v"], id=meta["id"], parameters=meta["p"],
                        outputs=outputs, inputs={spec[0]: a for spec, a in zip(meta["i"], arrays, strict=True)})


def dump_reply(reply: InferResponse | tuple) -> bytes:
    """An InferResponse, or an error tuple (always pickled: rare, and carries its class)."""
    if isinstance(reply, InferResponse) and _numeric(o.data for o in reply.outputs) \
            and all(o.shm is None for o in reply.outputs):
        meta = {"m": reply.model_name, "v": reply.model_version, "id": reply.id,
                "o": [[o.name, o.data.dtype.str, o.data.shape] for o in reply.outputs]}
        packed = _pack(meta, [o.data for o in reply.outputs])
        if packed is not None:
            return packed
    return _PICKLED + pickle.dumps(reply, protocol=5)


def load_reply(payload: bytes) -> InferResponse | tuple:
    if payload[:1] == _PICKLED:
        return pickle.loads(memoryview(payload)[1:])
    meta = _meta(payload)
    arrays = _unpack(payload, meta["o"])
    outputs = [OutputTensor(spec[0], a) for spec, a in zip(meta["o"], arrays, strict=True)]
    return InferResponse(model_name=meta["m"], model_version=meta["v"], id=meta["id"], outputs=outputs)
