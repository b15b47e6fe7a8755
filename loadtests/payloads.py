"""Infer request bodies built from a model's V2 metadata: JSON, or the binary tensor data extension.

Bodies are encoded once before the run, so the generator's per-request CPU is spent on HTTP only:
the client shares the machine's cores with the server, and every microsecond it spends is one the
server does not get.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import orjson

PROTOCOLS = ("json", "binary", "grpc")  # grpc: loadtests/grpcload.py
HEADER_LENGTH = "Inference-Header-Content-Length"

# V2 datatype -> numpy dtype; BF16 has no numpy dtype, so it is refused with a message.
_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


@dataclass(frozen=True)
class TensorMeta:
    """An input or output as the server's metadata lists it; -1 marks a dynamic dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_batch_size: int
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


@dataclass(frozen=True)
class EncodedRequest:
    """A ready-to-send infer body and the headers that describe it."""

    body: bytes
    headers: dict[str, str]
    rows: int


def _tensors(doc: dict, key: str) -> tuple[TensorMeta, ...]:
    try:
        return tuple(TensorMeta(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in doc[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model metadata has no valid {key!r} list (name, datatype, shape): {exc!r}") from None


def model_info(metadata: dict, config: dict | None) -> ModelInfo:
    """ModelInfo from GET /v2/models/<m> and, when the server has it, GET /v2/models/<m>/config."""
    inputs, outputs = _tensors(metadata, "inputs"), _tensors(metadata, "outputs")
    # A text model's `text` input is an alternative to its token inputs (config parameter text_input), not one
    # more input to send with them.
    alternative = ((config or {}).get("parameters") or {}).get("text_input", {}).get("string_value")
    inputs = tuple(t for t in inputs if t.name != alternative) if alternative else inputs
    if config is not None and "max_batch_size" in config:
        mbs = int(config["max_batch_size"])
    else:
        # Without a config endpoint, a leading -1 on every input is the only hint that the model batches.
        mbs = -1 if inputs and all(t.shape[:1] == (-1,) for t in inputs) else 0
    return ModelInfo(name=str(metadata.get("name", "")), max_batch_size=mbs, inputs=inputs, outputs=outputs)


def request_shapes(info: ModelInfo, *, batch: int, overrides: dict[str, list[int]]) -> dict[str, list[int]]:
    """The full shape of every input for a request of `batch` rows.

    `overrides` gives dims (without the batch dim) for inputs whose metadata has dynamic dims: we
    cannot guess a sequence length, and a wrong guess would benchmark a different workload.
    """
    unknown = set(overrides) - {t.name for t in info.inputs}
    if unknown:
        raise ValueError(f"--shape names unknown input(s) {sorted(unknown)}; inputs are {[t.name for t in info.inputs]}")
    if not info.batched and batch != 1:
        raise ValueError(f"model {info.name!r} does not batch (max_batch_size 0); use --batch 1")
    if info.max_batch_size > 0 and batch > info.max_batch_size:
        raise ValueError(f"--batch {batch} exceeds model {info.name!r}'s max_batch_size {info.max_batch_size}")
    shapes = {}
    for t in info.inputs:
        dims = list(t.shape[1:] if info.batched else t.shape)
        if t.name in overrides:
            given = overrides[t.name]
            if len(given) != len(dims) or any(d != -1 and d != g for d, g in zip(dims, given)):
                raise ValueError(f"--shape {t.name}={given} does not fit the model's dims {dims} (-1 = any)")
            dims = list(given)
        if any(d < 0 for d in dims):
            raise ValueError(
                f"input {t.name!r} has dynamic dims {dims}; pass --shape {t.name}=" + ",".join(
                    "N" if d < 0 else str(d) for d in dims) + " with the sizes to send"
            )
        shapes[t.name] = ([batch] if info.batched else []) + dims
    return shapes


def random_inputs(
    info: ModelInfo, *, shapes: dict[str, list[int]], rng: np.random.Generator, int_high: int
) -> dict[str, np.ndarray]:
    """Random data of each input's dtype. Integers are drawn from [0, int_high): inputs are often indices."""
    out = {}
    for t in info.inputs:
        if t.datatype not in _NUMPY:
            raise ValueError(f"input {t.name!r}: datatype {t.datatype} is not supported by the load generator")
        shape, dtype = shapes[t.name], _NUMPY[t.datatype]
        if t.datatype == "BYTES":
            arr = np.array([f"s{v}" for v in rng.integers(0, 10**6, prod(shape))], dtype=object).reshape(shape)
        elif t.datatype == "BOOL":
            arr = rng.random(shape) < 0.5
        elif t.datatype.startswith("FP"):
            arr = rng.standard_normal(shape).astype(dtype)
        else:
            arr = rng.integers(0, int_high, shape).astype(dtype)
        out[t.name] = arr
    return out


def npy_inputs(info: ModelInfo, *, files: dict[str, Path], shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Inputs from .npy files: each array is the full request shape, or one row that is repeated to the batch."""
    if "" in files:  # a bare FILE: only unambiguous for a single-input model
        if len(info.inputs) != 1:
            raise ValueError(f"--input-npy FILE without NAME= needs a one-input model; inputs are "
                             f"{[t.name for t in info.inputs]}")
        files = {info.inputs[0].name: files[""]}
    out = {}
    for t in info.inputs:
        if t.name not in files:
            raise ValueError(f"--input-npy gives no file for input {t.name!r}; give NAME=FILE for each input")
        arr = np.load(files[t.name], allow_pickle=t.datatype == "BYTES")
        want = shapes[t.name]
        if info.batched and list(arr.shape) == want[1:]:
            arr = np.repeat(arr[None], want[0], axis=0)
        if list(arr.shape) != want:
            raise ValueError(f"{files[t.name]}: shape {list(arr.shape)} fits neither {want} nor one row {want[1:]}")
        expected = _NUMPY.get(t.datatype)
        if expected is not np.object_ and arr.dtype != expected:
            raise ValueError(f"{files[t.name]}: dtype {arr.dtype}, input {t.name!r} is {t.datatype}")
        out[t.name] = arr
    return out


def _bytes_elements(arr: np.ndarray) -> bytes:
    # BYTES in the binary extension: each element is a 4-byte little-endian length, then the bytes.
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def _json_data(arr: np.ndarray) -> Any:
    if arr.dtype == object:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
    return np.ascontiguousarray(arr.reshape(-1))


def encode(inputs: dict[str, np.ndarray], *, info: ModelInfo, protocol: str) -> EncodedRequest:
    """One infer body; outputs are asked for in the same encoding, so responses cost what clients would pay."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    binary = protocol == "binary"
    header_inputs, tail = [], []
    for t in info.inputs:
        arr = inputs[t.name]
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(arr.shape)}
        if binary:
            raw = _bytes_elements(arr) if t.datatype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _json_data(arr)
        header_inputs.append(entry)
    doc: dict[str, Any] = {
        "inputs": header_inputs,
        "outputs": [{"name": o.name, "parameters": {"binary_data": binary}} for o in info.outputs],
    }
    if binary:
        doc["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    rows = next(iter(inputs.values())).shape[0] if info.batched else 1
    if not binary:
        return EncodedRequest(header, {"Content-Type": "application/json"}, rows)
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return EncodedRequest(header + b"".join(tail), headers, rows)


def check_response(body: bytes, *, header_length: str | None, info: ModelInfo, rows: int) -> str | None:
    """None when a 200 response carries every output with the right row count; else what is wrong.

    Cheap on purpose (one JSON parse, no tensor decode): it runs once per request inside the timed loop.
    """
    try:
        hlen = int(header_length) if header_length is not None else len(body)
        doc = orjson.loads(memoryview(body)[:hlen])
        outputs = {o["name"]: o for o in doc["outputs"]}
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable response: {exc!r}"
    missing = [o.name for o in info.outputs if o.name not in outputs]
    if missing:
        return f"response lacks output(s) {missing}"
    binary_total = 0
    for o in outputs.values():
        shape = o.get("shape") or []
        if info.batched and shape[:1] != [rows]:
            return f"output {o.get('name')!r} has shape {shape}, expected {rows} row(s)"
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            binary_total += int(size)
        elif "data" not in o:
            return f"output {o.get('name')!r} has neither data nor binary_data_size"
    if binary_total != len(body) - hlen:
        return f"binary outputs declare {binary_total} bytes, body carries {len(body) - hlen}"
    return None
