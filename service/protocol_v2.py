"""KServe V2 inference codec for HTTP: JSON (flat and nested data) and the binary tensor data extension.

A request body is a JSON header, optionally followed by raw tensor bytes whose JSON length is given by
the `Inference-Header-Content-Length` header; each input carrying `parameters.binary_data_size` takes
that many bytes from the tail, in input order. BYTES elements are each prefixed by a 4-byte little-endian
length. We write this codec ourselves because tritonclient ships only the client side of it.
"""

from __future__ import annotations

import struct
from math import prod
from typing import Any

import numpy as np
import orjson

from service.core import InferRequest, InferResponse, RequestedOutput
from service.datatypes import numpy_dtype, v2_datatype
from service.errors import InvalidInput

_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


def _shape(inp: dict, name: str) -> list[int]:
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _flatten_bytes(data: Any, out: list) -> None:
    for item in data:
        if isinstance(item, list):
            _flatten_bytes(item, out)
        elif isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, (bytes, int, float, bool)):
            out.append(item if isinstance(item, bytes) else str(item).encode())
        else:
            raise InvalidInput(f"BYTES data holds {type(item).__name__}; expected strings")


def tensor_from_json(data: Any, *, name: str, datatype: str, shape: list[int]) -> np.ndarray:
    """An array from a V2 JSON `data` field (flat or nested), checked against shape."""
    dtype = numpy_dtype(datatype)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat: list = []
        _flatten_bytes(data, flat)
        arr = np.empty(len(flat), dtype=object)
        arr[:] = flat
    else:
        try:
            arr = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            raise InvalidInput(f"input {name!r}: 'data' is not a list of {datatype} values with a regular shape") from None
    if arr.size != prod(shape):
        raise InvalidInput(f"input {name!r}: shape {shape} needs {prod(shape)} elements, 'data' has {arr.size}")
    return arr.reshape(shape)


def tensor_from_binary(raw: memoryview, *, name: str, datatype: str, shape: list[int]) -> np.ndarray:
    """An array from the raw bytes of the binary tensor data extension."""
    n = prod(shape)
    if datatype != "BYTES":
        dtype = numpy_dtype(datatype)
        if len(raw) != n * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: shape {shape} of {datatype} needs {n * dtype.itemsize} bytes, "
                f"binary_data_size gives {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES element {len(items)} is cut inside its 4-byte length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES element {len(items)} claims {length} bytes past the data's end")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    if len(items) != n:
        raise InvalidInput(f"input {name!r}: shape {shape} needs {n} BYTES elements, got {len(items)}")
    arr = np.empty(n, dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def _parse_header(header: bytes | memoryview) -> dict:
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"request body must be a JSON object with 'inputs', got {type(doc).__name__}")
    return doc


def _requested_outputs(doc: dict, binary_default: bool | None) -> list[RequestedOutput] | None:
    outputs = doc.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise InvalidInput("'outputs' must be a list of objects with a string 'name'")
    result = []
    for o in outputs:
        params = o.get("parameters") or {}
        binary = params.get("binary_data", binary_default)
        class_count = params.get("classification", 0)
        if not isinstance(class_count, int) or class_count < 0:
            raise InvalidInput(f"output {o['name']!r}: 'classification' must be a non-negative integer")
        result.append(RequestedOutput(o["name"], None if binary is None else bool(binary), class_count))
    return result


def decode_request(
    body: bytes, *, header_length: int | None, model_name: str, model_version: str | None
) -> InferRequest:
    """Parse a V2 infer request body (JSON, or JSON plus binary tensor data)."""
    view = memoryview(body)
    if header_length is None:
        header, tail = view, view[:0]
    else:
        if not 0 <= header_length <= len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length} is outside the body's {len(body)} bytes"
            )
        header, tail = view[:header_length], view[header_length:]
    doc = _parse_header(header)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors (name, shape, datatype, data)")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for inp in raw_inputs:
        name = inp.get("name") if isinstance(inp, dict) else None
        if not isinstance(name, str):
            raise InvalidInput("every input needs a string 'name'")
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given twice")
        shape, datatype = _shape(inp, name), inp.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name!r}: 'datatype' must be a string such as \"FP32\"")
        size = (inp.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size!r} does not fit the {len(tail) - offset} binary bytes left"
                )
            inputs[name] = tensor_from_binary(tail[offset:offset + size], name=name, datatype=datatype, shape=shape)
            offset += size
        elif "data" in inp:
            inputs[name] = tensor_from_json(inp["data"], name=name, datatype=datatype, shape=shape)
        else:
            raise InvalidInput(f"input {name!r}: needs 'data' or parameters.binary_data_size")
    if offset != len(tail):
        raise InvalidInput(f"{len(tail) - offset} bytes of binary data follow the inputs and belong to none")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    binary_default = params.get("binary_data_output")
    request_id = doc.get("id")
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=_requested_outputs(doc, binary_default),
        id=str(request_id) if request_id is not None else None,
        parameters=params,
    )


def tensor_to_bytes(arr: np.ndarray) -> bytes:
    """Raw bytes of a tensor as the binary extension (and gRPC raw contents) carry it."""
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        parts = []
        for item in arr.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr).tobytes()


def _to_json_data(arr: np.ndarray) -> Any:
    flat = arr.reshape(-1)
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in flat]
    if arr.dtype == np.float16:
        flat = flat.astype(np.float32)
    return np.ascontiguousarray(flat)


def encode_response(resp: InferResponse, *, binary_default: bool) -> tuple[bytes, int | None]:
    """Serialize a response; returns (body, json header length or None when there is no binary part)."""
    outputs, chunks = [], []
    for out in resp.outputs:
        arr = out.data
        entry: dict[str, Any] = {"name": out.name, "datatype": v2_datatype(arr), "shape": list(arr.shape)}
        if out.binary if out.binary is not None else binary_default:
            raw = tensor_to_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json_data(arr)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs}
    if resp.id is not None:
        doc["id"] = resp.id
    header = orjson.dumps(doc, option=_NUMPY_JSON)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)
