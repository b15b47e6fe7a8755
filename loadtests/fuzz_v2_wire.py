"""A fuzz `Case` on the wire (HTTP JSON flat / nested, HTTP binary extension, gRPC typed / raw contents), the
framing attacks only one transport can carry, and the reading of answers into (outcome, outputs).

Tensors are serialized with tritonclient's own helpers (serialize_byte_tensor and the raw layout its clients
send), not with the server's codec, so a codec bug cannot hide itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from loadtests.fuzz_v2_cases import Case, Tensor

# HTTP status -> the gRPC code the same refusal must carry (service/protocol_grpc.py's table, written out again
# here so a change there is caught).
GRPC_CODE = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
JSON_ATTACKS = ["string", "bool", "null", "fraction", "range", "nan", "infinity", "ragged"]
BINARY_ATTACKS = ["header_short", "header_long", "header_huge", "header_negative", "header_text", "size_plus",
                  "size_minus", "tail_extra", "tail_short", "bytes_prefix"]
GRPC_ATTACKS = ["both", "raw_extra", "raw_missing", "raw_short", "wrong_field", "odd_parameters"]
# gRPC parameter types JSON has no twin for (uint64, and doubles where integers are read), on read keys and others.
ODD_PARAMETERS = [("priority", "uint64_param", 2**64 - 1), ("timeout", "double_param", 0.5),
                  ("sequence_id", "uint64_param", 7), ("sequence_start", "string_param", "\x00"),
                  ("binary_data_output", "double_param", 1.0), ("custom", "uint64_param", 2**63)]


@dataclass
class Answer:
    """One answer: 'ok' with outputs, or the status ('400', 'INVALID_ARGUMENT', ...) and the error message."""

    status: str
    message: str = ""
    outputs: dict[str, np.ndarray] | None = None


def raw(t: Tensor) -> bytes:
    if t.array.dtype == object:
        packed = serialize_byte_tensor(t.array.reshape(-1))
        return packed.item() if packed.size else b""
    return np.ascontiguousarray(t.array).tobytes()


def _json_data(t: Tensor, nested: bool) -> Any:
    flat = t.array.reshape(-1)
    data = [b.decode() for b in flat] if t.array.dtype == object else flat.tolist()
    if nested and t.array.size == prod_(t.shape) and len(t.shape) > 1:
        return np.asarray(data, dtype=object).reshape(t.shape).tolist() if data else data
    return data


def prod_(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def _header(case: Case, inputs: list[dict]) -> dict:
    doc: dict[str, Any] = {"id": "fuzz", "inputs": inputs}
    if case.outputs is not None:
        doc["outputs"] = [{"name": n} for n in case.outputs]
    if case.parameters:
        doc["parameters"] = case.parameters
    return doc


def to_json(case: Case, *, nested: bool, attack: str | None = None, binary_out: bool = False) -> tuple[bytes, bool]:
    """The case as a V2 JSON body; `attack` (one of JSON_ATTACKS) spoils one element of the first tensor that
    has one, in a way the JSON datatype rules refuse; `binary_out` asks for binary outputs. Also says whether
    the attack applied."""
    inputs = [{"name": t.name, "shape": t.shape, "datatype": t.datatype, "data": _json_data(t, nested)}
              for t in case.tensors]
    target = next((i for i, t in enumerate(case.tensors) if t.array.size), None)
    marker = None
    if attack is not None and target is not None:
        marker = _spoil(inputs[target], case.tensors[target].datatype, attack)
    doc = _header(case, inputs)
    if binary_out:  # the outputs come back in the binary tail (the request's parameters are only HTTP's here)
        doc["parameters"] = {**doc.get("parameters", {}), "binary_data_output": True}
    body = orjson.dumps(doc)
    if marker is not None:  # values JSON has no literal for, spelt out after the encoder
        body = body.replace(b'"__SPOIL__"', marker)
    return body, attack is not None and target is not None


def _all(data: Any, value: Any) -> Any:
    return [_all(d, value) for d in data] if isinstance(data, list) else value


def _spoil(inp: dict, datatype: str, attack: str) -> bytes | None:
    """Replace the first element with a value datatype `datatype` must refuse; a marker's raw JSON text.
    NOTE: "bool" makes every element true (1 for BOOL): a single true among numbers is read as 1, as numpy
    reads it (docs/RELIABILITY.md, round 5)."""
    if attack == "bool":
        inp["data"] = _all(inp["data"], 1 if datatype == "BOOL" else True)
        return None
    flat = inp["data"]
    while isinstance(flat[0], list):
        flat = flat[0]
    # A 2**64 literal reads as a double: out of range for every integer type and FP16, not for FP32/FP64.
    big = {"FP32": b"1e39", "FP64": b"1e309"}.get(datatype, b"18446744073709551616")
    texts = {"nan": b"NaN", "infinity": b"Infinity", "range": big}
    is_int = datatype.startswith(("INT", "UINT"))
    bad: Any = {"string": "1", "bool": True, "null": None, "fraction": 1.5, "ragged": [[1], [1, 2]]}.get(attack)
    if datatype == "BYTES" and attack == "range":
        attack, bad = "null", None  # BYTES takes numbers as their text
    if attack == "range" and datatype == "INT8":
        bad = 300
    elif attack == "range" and datatype.startswith("UINT"):
        bad = -1
    elif attack in texts:
        flat[0] = "__SPOIL__"
        return texts[attack]
    if datatype == "BYTES" and attack in ("string", "fraction"):
        bad = None  # BYTES takes strings (and numbers as their text)
    elif not is_int and attack == "fraction" and datatype != "BOOL":
        bad = "1.5"
    flat[0] = bad
    return None


def to_binary(case: Case, *, attack: str | None = None) -> tuple[bytes, dict[str, str], bool]:
    """The case with every tensor in the binary tail; `attack` (one of BINARY_ATTACKS) breaks the framing.
    Also says whether the attack applied."""
    blobs = [raw(t) for t in case.tensors]
    applied = attack is not None and attack.startswith("header")
    if attack == "bytes_prefix":
        spot = next((i for i, t in enumerate(case.tensors) if t.datatype == "BYTES" and t.array.size), None)
        if spot is not None:  # the first element claims more bytes than the tensor holds
            blobs[spot] = struct.pack("<I", 2**32 - 1) + blobs[spot][4:]
            applied = True
    sizes = [len(b) for b in blobs]
    if sizes and attack in ("size_plus", "size_minus") and (attack == "size_plus" or sizes[-1]):
        sizes[-1] += 1 if attack == "size_plus" else -1
        applied = True
    inputs = [{"name": t.name, "shape": t.shape, "datatype": t.datatype, "parameters": {"binary_data_size": n}}
              for t, n in zip(case.tensors, sizes)]
    header = orjson.dumps(_header(case, inputs))
    tail = b"".join(blobs)
    if attack == "tail_extra":
        tail += b"\x00"
        applied = True
    elif attack == "tail_short" and tail:
        tail = tail[:-1]
        applied = True
    length: str = str(len(header))
    length = {"header_short": str(len(header) - 1), "header_long": str(len(header) + 1),
              "header_huge": str(10**15), "header_negative": "-1", "header_text": "12a"}.get(attack or "", length)
    return header + tail, {"Inference-Header-Content-Length": length, "Content-Type": "application/octet-stream"}, applied


def _set_param(message: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        message[key].bool_param = value
    elif isinstance(value, int):
        message[key].int64_param = value
    elif isinstance(value, float):
        message[key].double_param = value
    else:
        message[key].string_param = value


_TYPED = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
          "INT64": "int64_contents", "UINT8": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
          "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def to_grpc(case: Case, *, use_raw: bool, attack: str | None = None) -> tuple[pb.ModelInferRequest, bool]:
    """The case as a ModelInferRequest, typed contents (where the datatype has a field) or raw; `attack` (one of
    GRPC_ATTACKS) breaks the pairing of tensors and contents. Also says whether the attack applied."""
    req = pb.ModelInferRequest(model_name=case.model, id="fuzz")
    use_raw = use_raw or any(t.datatype not in _TYPED for t in case.tensors) or attack not in (None, "wrong_field")
    applied = False
    for t in case.tensors:
        tensor = req.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if use_raw:
            req.raw_input_contents.append(raw(t))
        else:
            field = _TYPED[t.datatype]
            if attack == "wrong_field" and t.array.size:
                field = "fp64_contents" if field != "fp64_contents" else "int64_contents"
                applied = True
            values = t.array.reshape(-1).tolist()
            getattr(tensor.contents, field).extend(values if field == _TYPED[t.datatype] else [1] * len(values))
    for name in case.outputs or []:
        req.outputs.add(name=name)
    for key, value in case.parameters.items():
        _set_param(req.parameters, key, value)
    if attack == "both" and req.inputs:
        req.inputs[0].contents.fp32_contents.append(1.0)
        applied = True
    elif attack == "raw_extra":
        req.raw_input_contents.append(b"\x00" * 4)
        applied = True
    elif attack == "raw_missing" and req.raw_input_contents and (len(req.raw_input_contents) > 1
                                                                 or req.raw_input_contents[-1]):
        del req.raw_input_contents[-1]  # (the only, empty one gone leaves a valid request: typed, no elements)
        applied = True
    elif attack == "odd_parameters":  # may be refused or taken; if taken, the answer must be right
        for key, kind, value in ODD_PARAMETERS:
            setattr(req.parameters[key], kind, value)
    elif attack == "raw_short" and req.raw_input_contents and req.raw_input_contents[0]:
        req.raw_input_contents[0] = req.raw_input_contents[0][:-1]
        applied = True
    return req, applied


def read_http(status: int, body: bytes, headers: Any) -> Answer:
    if status != 200:
        try:
            message = orjson.loads(body).get("error", "")
        except (orjson.JSONDecodeError, AttributeError):
            message = body[:200].decode(errors="replace")
        return Answer(str(status), message if isinstance(message, str) else str(message))
    length = headers.get("inference-header-content-length")
    header = orjson.loads(body[:int(length)] if length else body)
    tail, offset, outputs = body[int(length):] if length else b"", 0, {}
    for out in header["outputs"]:
        datatype, shape = out["datatype"], out["shape"]
        if "data" in out:
            data = out["data"]
            arr = (np.array([s.encode() for s in data], dtype=object) if datatype == "BYTES"
                   else np.asarray(data, dtype=triton_to_np_dtype(datatype)))
        else:
            size = out["parameters"]["binary_data_size"]
            chunk, offset = tail[offset:offset + size], offset + size
            arr = (deserialize_bytes_tensor(chunk) if datatype == "BYTES"
                   else np.frombuffer(chunk, dtype=triton_to_np_dtype(datatype)))
        outputs[out["name"]] = arr.reshape(shape)
    return Answer("ok", outputs=outputs)


def read_grpc(response: pb.ModelInferResponse) -> Answer:
    outputs = {}
    for out, chunk in zip(response.outputs, response.raw_output_contents):
        arr = (deserialize_bytes_tensor(chunk) if out.datatype == "BYTES"
               else np.frombuffer(chunk, dtype=triton_to_np_dtype(out.datatype)))
        outputs[out.name] = arr.reshape(list(out.shape))
    return Answer("ok", outputs=outputs)
