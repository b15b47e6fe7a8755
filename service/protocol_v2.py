"""KServe V2 over HTTP, the wire format: JSON (flat and nested data) and the binary tensor data extension.

A request body is a JSON header, optionally followed by raw tensor bytes whose JSON length is given by
the `Inference-Header-Content-Length` header; each input carrying `parameters.binary_data_size` takes
that many bytes from the tail, in input order. Tensors themselves are built by the shared codec
(service/codec.py); this module only reads and writes the HTTP framing, including the HTTP-only choice of
binary or JSON outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np
import orjson

from service import codec
from service.core import InferRequest, InferResponse, RequestedOutput
from service.datatypes import numpy_dtype, v2_datatype
from service.errors import InvalidInput
from service.modelrepo.config import ModelSpec, TensorSpec
from service.shm import SharedMemoryRegistry, read_input

_NUMPY_JSON = orjson.OPT_SERIALIZE_NUMPY


@dataclass
class OutputEncoding:
    """How the client wants outputs back over HTTP: binary or JSON, per output or by default."""

    default: bool = False
    per_output: dict[str, bool] = field(default_factory=dict)

    def binary(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


def _parameters(value: object, *, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: 'parameters' must be a JSON object, got {type(value).__name__}")
    return value


def _flag(value: object, *, where: str) -> bool:
    # NOTE: bool("false") is True: a string here would silently pick the opposite encoding.
    if not isinstance(value, bool):
        raise InvalidInput(f"{where} must be true or false, got {value!r:.80}")
    return value


def _parse_header(header: bytes | memoryview) -> dict:
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"request body must be a JSON object with 'inputs', got {type(doc).__name__}")
    return doc


def _requested_outputs(doc: dict, encoding: OutputEncoding,
                       shm: SharedMemoryRegistry | None = None) -> list[RequestedOutput] | None:
    outputs = doc.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise InvalidInput("'outputs' must be a list of objects with a string 'name'")
    result = []
    for o in outputs:
        params = _parameters(o.get("parameters"), where=f"output {o['name']!r}")
        binary = params.get("binary_data")
        if binary is not None:
            encoding.per_output[o["name"]] = _flag(binary, where=f"output {o['name']!r}: parameter 'binary_data'")
        class_count = params.get("classification", 0)
        if not isinstance(class_count, int) or isinstance(class_count, bool) or class_count < 0:
            raise InvalidInput(f"output {o['name']!r}: 'classification' must be a non-negative integer")
        ref = shm.ref(params, tensor=o["name"]) if shm is not None else None
        result.append(RequestedOutput(o["name"], class_count, ref))
    return result


def _decode_input(inp: object, *, tail: memoryview, offset: int, model: str, max_bytes: int,
                  shm: SharedMemoryRegistry | None = None) -> tuple[str, np.ndarray, int]:
    name = inp.get("name") if isinstance(inp, dict) else None
    if not isinstance(inp, dict) or not isinstance(name, str):
        raise InvalidInput("every input needs a string 'name'")
    datatype = inp.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name!r}: 'datatype' must be a string such as \"FP32\"")
    shape = codec.check_shape(inp.get("shape"), name=name, datatype=datatype)
    codec.check_byte_budget(shape, name=name, datatype=datatype, limit=max_bytes)
    params = _parameters(inp.get("parameters"), where=f"input {name!r}")
    ref = shm.ref(params, tensor=name) if shm is not None else None
    if ref is not None:
        if "data" in inp:
            raise InvalidInput(f"input {name!r}: 'data' must not be set when the input is in shared memory")
        expected = None if datatype == "BYTES" else codec.element_count(shape) * numpy_dtype(datatype).itemsize
        raw = read_input(ref, name=name, expected=expected)
        return name, codec.from_raw(raw, name=name, datatype=datatype, shape=shape), 0
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
            raise InvalidInput(
                f"input {name!r}: binary_data_size {size!r} does not fit the {len(tail) - offset} binary bytes left"
            )
        return name, codec.from_raw(tail[offset:offset + size], name=name, datatype=datatype, shape=shape,
                                        model=model), size
    if "data" in inp:
        return name, codec.from_values(inp["data"], name=name, datatype=datatype, shape=shape), 0
    raise InvalidInput(f"input {name!r}: needs 'data' or parameters.binary_data_size")


def decode_request(
    body: bytes, *, header_length: int | None, model_name: str, model_version: str | None,
    max_tensor_bytes: int = 2**62,
    shm: SharedMemoryRegistry | None = None,
) -> tuple[InferRequest, OutputEncoding]:
    """Parse a V2 infer request body (JSON, or JSON plus binary tensor data); no input may need more than
    `max_tensor_bytes` (the server passes max_request_bytes)."""
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
    if not isinstance(raw_inputs, list):
        raise InvalidInput("'inputs' must be a list of tensors (name, shape, datatype, data)")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for inp in raw_inputs:
        name, array, used = _decode_input(inp, tail=tail, offset=offset, model=model_name,
                                          max_bytes=max_tensor_bytes, shm=shm)
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if offset != len(tail):
        raise InvalidInput(f"{len(tail) - offset} bytes of binary data follow the inputs and belong to none")
    params = _parameters(doc.get("parameters"), where="request")
    encoding = OutputEncoding(default=_flag(params.get("binary_data_output", False),
                                            where="request parameter 'binary_data_output'"))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"request 'id' must be a string, got {type(request_id).__name__} {request_id!r:.80}")
    request = InferRequest(
        model_name=model_name,
        model_version=model_version,
        inputs=inputs,
        outputs=_requested_outputs(doc, encoding, shm),
        id=request_id,
        parameters=params,
    )
    return request, encoding


def decode_raw_request(
    body: bytes, *, spec: ModelSpec, model_name: str, model_version: str | None
) -> tuple[InferRequest, OutputEncoding]:
    """Triton's raw binary request (`Inference-Header-Content-Length: 0`): the whole body is the data of the
    model's only input, its shape deduced from the config (batch 1), and every output comes back binary."""
    if len(spec.inputs) != 1:
        raise InvalidInput(
            f"Raw request must only have 1 input (found 1) to be deduced but got {len(spec.inputs)} inputs in "
            f"'{model_name}' model configuration; send a JSON header (Inference-Header-Content-Length > 0) instead"
        )
    t = spec.inputs[0]
    full = ([1] if spec.max_batch_size > 0 else []) + list(t.dims)
    if t.datatype == "BYTES":
        if any(d != 1 for d in t.dims):
            raise InvalidInput(f"For BYTE datatype raw input '{t.name}', the model must have input shape [1]; "
                               f"model '{model_name}' has {list(t.dims)}, so send a JSON header instead")
        array = codec.bytes_array([bytes(body)], [1] * len(full))
    else:
        array = codec.from_raw(body, name=t.name, datatype=t.datatype, shape=_raw_shape(t, full, len(body)),
                               model=model_name)
    request = InferRequest(model_name=model_name, model_version=model_version, inputs={t.name: array})
    return request, OutputEncoding(default=True)


def _raw_shape(t: TensorSpec, full: list[int], size: int) -> list[int]:
    variable = [i for i, d in enumerate(full) if d == -1]
    if len(variable) > 1:
        raise InvalidInput(f"The shape of the raw input '{t.name}' can not be deduced because there are more than "
                           f"one variable-sized dimension in {full}; send a JSON header with the shape instead")
    if not variable:
        return full
    known = numpy_dtype(t.datatype).itemsize * prod(d for d in full if d != -1)
    if known == 0 or size % known:
        raise InvalidInput(f"raw input '{t.name}': {size} bytes is not a whole number of {t.datatype} elements of "
                           f"shape {full} ({known} bytes per step of the variable dimension)")
    return [size // known if d == -1 else d for d in full]


def _to_json_data(arr: np.ndarray) -> Any:
    flat = arr.reshape(-1)
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        return [x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in flat]
    if arr.dtype == np.float16:
        flat = flat.astype(np.float32)
    return np.ascontiguousarray(flat)


# (model, version, id, ((name, dtype, shape), ...)) -> the JSON header of an all-binary response; bounded.
_HEADERS: dict[tuple, bytes] = {}
_MAX_HEADERS = 256


def _binary_header(resp: InferResponse) -> bytes:
    """The JSON header when every output goes in the binary tail: built once per output layout."""
    key = (resp.model_name, resp.model_version, resp.id,
           tuple([(o.name, o.data.dtype, o.data.shape) for o in resp.outputs]))
    header = _HEADERS.get(key)
    if header is None:
        outputs = [{"name": o.name, "datatype": v2_datatype(o.data), "shape": list(o.data.shape),
                    "parameters": {"binary_data_size": o.data.nbytes}} for o in resp.outputs]
        doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs}
        if resp.id is not None:
            doc["id"] = resp.id
        header = orjson.dumps(doc)
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.clear()
        _HEADERS[key] = header
    return header


def encode_response_parts(resp: InferResponse,
                          encoding: OutputEncoding) -> tuple[list[bytes | memoryview], int | None]:
    """A response as parts to write one after the other (JSON header, then each binary output, as views on
    the output arrays), and the JSON header's length, None when there is no binary part."""
    if resp.outputs and all(o.shm is None and o.data.dtype != object and o.data.dtype.kind not in ("U", "S")
                            and encoding.binary(o.name) for o in resp.outputs):
        header = _binary_header(resp)
        return [header, *[codec.raw_view(o.data) for o in resp.outputs]], len(header)
    outputs, chunks = [], []
    for out in resp.outputs:
        arr = out.data
        entry: dict[str, Any] = {"name": out.name, "datatype": v2_datatype(arr), "shape": list(arr.shape)}
        if out.shm is not None:
            # NOTE: no "parameters", as Triton: its C++ client (perf_analyzer) takes any output "parameters" to
            # hold "binary_data_size" and failed on the region's parameters.
            out.shm.write(codec.to_raw(arr), output=out.name)
        elif encoding.binary(out.name):
            raw = codec.raw_view(arr)
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
        return [header], None
    return [header, *chunks], len(header)


def encode_response(resp: InferResponse, encoding: OutputEncoding) -> tuple[bytes, int | None]:
    """Serialize a response; returns (body, json header length or None when there is no binary part)."""
    parts, header_length = encode_response_parts(resp, encoding)
    return b"".join(parts), header_length
