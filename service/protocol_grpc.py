"""KServe V2 over gRPC, the wire format: ModelInferRequest/Response (typed or raw contents) and status codes.

Tensors are built by the shared codec (service/codec.py), exactly as for HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from service import codec
from service.core import InferRequest, InferResponse, RequestedOutput
from service.datatypes import numpy_dtype, v2_datatype
from service.errors import InvalidInput, ServingError
from service.modelrepo.overrides import FILE_PREFIX
from service.shm import SharedMemoryRegistry, read_input


@dataclass(frozen=True)
class Unparsable:
    """What the request deserializer hands over when the bytes are not the method's protobuf.

    NOTE: grpc.aio deserializes before the handler runs and answers a deserializer's exception itself (not
    with INVALID_ARGUMENT), so the deserializer never raises: the handler sees this and answers
    INVALID_ARGUMENT naming the message type.
    """

    message_type: str
    reason: str


def lenient(message_class: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # protobuf's DecodeError, or anything else a malformed message raises
            return Unparsable(message_class.DESCRIPTOR.name, type(exc).__name__)

    return deserialize


# A ServingError's HTTP status -> the gRPC status code Triton's clients expect for it.
_STATUS_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# InferTensorContents field holding each V2 datatype when a client sends typed (not raw) contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def grpc_status(exc: ServingError) -> grpc.StatusCode:
    return _STATUS_TO_GRPC.get(exc.status_code, grpc.StatusCode.INTERNAL)


def param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _typed_contents(tensor: Any, shape: list[int]) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} must be sent as raw_input_contents")
    values = getattr(tensor.contents, field)
    codec.check_element_count(len(values), shape, name=tensor.name, datatype=tensor.datatype, what="'data'")
    return codec.from_values(list(values), name=tensor.name, datatype=tensor.datatype, shape=shape)


def _class_count(output: Any) -> int:
    if "classification" not in output.parameters:
        return 0
    value = param_value(output.parameters["classification"])
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"output {output.name!r}: 'classification' must be a non-negative integer, got {value!r}")
    return value


def _params(parameters: Any) -> dict[str, Any]:
    return {k: param_value(v) for k, v in parameters.items()}


def _shm_input(tensor: Any, shape: list[int], shm: SharedMemoryRegistry | None) -> np.ndarray | None:
    """The input read from shared memory when its parameters name a region (system shared memory extension)."""
    if shm is None or "shared_memory_region" not in tensor.parameters:
        return None
    ref = shm.ref(_params(tensor.parameters), tensor=tensor.name)
    assert ref is not None
    expected = None if tensor.datatype == "BYTES" else codec.element_count(shape) * numpy_dtype(tensor.datatype).itemsize
    raw = read_input(ref, name=tensor.name, expected=expected)
    return codec.from_raw(raw, name=tensor.name, datatype=tensor.datatype, shape=shape)


def _requested(output: Any, shm: SharedMemoryRegistry | None) -> RequestedOutput:
    ref = shm.ref(_params(output.parameters), tensor=output.name) if shm is not None else None
    return RequestedOutput(output.name, _class_count(output), ref)


@lru_cache(maxsize=1024)
def _checked_shape(shape: tuple[int, ...], *, name: str, datatype: str, limit: int) -> None:
    """Shape checks once per (shape, name, datatype, limit): the hot path sends the same few again and again
    (only successes are remembered: lru_cache does not keep exceptions)."""
    codec.check_byte_budget(codec.check_shape(list(shape), name=name, datatype=datatype), name=name,
                            datatype=datatype, limit=limit)


def decode_infer(request: pb.ModelInferRequest, *, shm: SharedMemoryRegistry | None = None,
                 max_tensor_bytes: int = 2**62) -> InferRequest:
    """A protocol-agnostic InferRequest from a ModelInferRequest (raw or typed contents, or shared memory); no
    input may need more than `max_tensor_bytes` (the server passes max_request_bytes)."""
    raw = list(request.raw_input_contents)
    inputs: dict[str, np.ndarray] = {}
    used = 0
    for tensor in request.inputs:
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        numpy_dtype(tensor.datatype)  # raises with the list of valid datatypes
        shape = list(tensor.shape)
        _checked_shape(tuple(shape), name=tensor.name, datatype=tensor.datatype, limit=max_tensor_bytes)
        from_shm = _shm_input(tensor, shape, shm)
        if from_shm is not None:
            inputs[tensor.name] = from_shm
        elif raw:
            if tensor.HasField("contents"):  # Triton's words: a tensor is raw or typed, never both
                raise InvalidInput(f"contents field must not be specified when using raw_input_contents for "
                                   f"{tensor.name!r} for model {request.model_name!r}")
            if used >= len(raw):
                raise InvalidInput(f"{len(raw)} raw_input_contents for more inputs; expected one per input not in "
                                   "shared memory")
            inputs[tensor.name] = codec.from_raw(raw[used], name=tensor.name, datatype=tensor.datatype, shape=shape,
                                                 model=request.model_name)
            used += 1
        else:
            inputs[tensor.name] = _typed_contents(tensor, shape)
    if used != len(raw):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {used} inputs; expected one per input not in "
                           "shared memory")
    outputs = [_requested(o, shm) for o in request.outputs] or None
    return InferRequest(model_name=request.model_name, model_version=request.model_version or None,
                        inputs=inputs, outputs=outputs, id=request.id or None, parameters=_params(request.parameters))


def _set_param(params: Any, key: str, value: Any) -> None:
    if isinstance(value, str):
        params[key].string_param = value
    else:
        params[key].int64_param = value


def encode_infer(resp: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id or "")
    for tensor in resp.outputs:
        entry = out.outputs.add(name=tensor.name, datatype=v2_datatype(tensor.data), shape=list(tensor.data.shape))
        if tensor.shm is None:
            out.raw_output_contents.append(codec.to_raw(tensor.data))
            continue
        tensor.shm.write(codec.to_raw(tensor.data), output=tensor.name)
        for key, value in tensor.shm.parameters().items():
            _set_param(entry.parameters, key, value)
        # NOTE: raw_output_contents pairs with outputs by position, so a shared memory output holds an empty slot.
        out.raw_output_contents.append(b"")
    return out


# (model, version, ((name, dtype, shape), ...)) -> a serialized ModelInferResponse holding the name, version and
# output descriptions, without id or raw contents; bounded.
_TEMPLATES: dict[tuple, bytes] = {}
_MAX_TEMPLATES = 256
_ID_TAG = bytes([3 << 3 | 2])  # field 3 (id), length-delimited
_RAW_TAG = bytes([6 << 3 | 2])  # field 6 (raw_output_contents), length-delimited


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint. NOTE: hand-written because protobuf's Python API has no public way to
    append pre-serialized fields; its wire format is the documented, stable one."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _template(resp: InferResponse) -> bytes:
    key = (resp.model_name, resp.model_version, tuple([(t.name, t.data.dtype, t.data.shape) for t in resp.outputs]))
    template = _TEMPLATES.get(key)
    if template is None:
        msg = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version)
        for t in resp.outputs:
            msg.outputs.add(name=t.name, datatype=v2_datatype(t.data), shape=list(t.data.shape))
        template = msg.SerializeToString()
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
    return template


def encode_infer_wire(resp: InferResponse) -> bytes | pb.ModelInferResponse:
    """The serialized ModelInferResponse, built from a template per output layout plus the id and each
    output's raw bytes (views on the output arrays, joined once). Protobuf parsers merge fields in any
    order, so template + id + raw contents is the same message encode_infer builds. Shared memory outputs
    take encode_infer (a message; the servicer's serializer takes both)."""
    if any(t.shm is not None for t in resp.outputs):
        return encode_infer(resp)
    parts: list[bytes | memoryview] = [_template(resp)]
    if resp.id:
        ident = resp.id.encode()
        parts += [_ID_TAG, _varint(len(ident)), ident]
    for t in resp.outputs:
        raw = codec.raw_view(t.data)
        parts += [_RAW_TAG, _varint(len(raw)), raw]
    return b"".join(parts)


def load_overrides(request: pb.RepositoryModelLoadRequest) -> tuple[object | None, dict[str, bytes]]:
    """Triton's load parameters over gRPC: 'config' (string_param, JSON) and 'file:<path>' (bytes_param)."""
    files = {}
    for key, param in request.parameters.items():
        if key.startswith(FILE_PREFIX):
            if param.WhichOneof("parameter_choice") != "bytes_param":
                raise InvalidInput(f"failed to load '{request.model_name}': parameter {key!r} must be a "
                                   "bytes_param holding the file's contents")
            files[key[len(FILE_PREFIX):]] = param.bytes_param
    config = request.parameters["config"] if "config" in request.parameters else None
    return (param_value(config) if config is not None else None), files


def unload_dependents(request: pb.RepositoryModelUnloadRequest) -> bool:
    """Triton's unload parameter `unload_dependents` (a bool_param; tritonclient sends it only when true)."""
    if "unload_dependents" not in request.parameters:
        return False
    value = param_value(request.parameters["unload_dependents"])
    if not isinstance(value, bool):
        raise InvalidInput(f"failed to unload '{request.model_name}': 'unload_dependents' must be a bool_param, "
                           f"got {value!r:.80}")
    return value
