"""KServe V2 over gRPC, with the service definition tritonclient ships, so `tritonclient.grpc` works unchanged.

Like the HTTP transport, the servicer only parses, calls the InferenceCore, and serializes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.core import InferenceCore, InferRequest, InferResponse, RequestedOutput
from service.datatypes import numpy_dtype, v2_datatype
from service.errors import InvalidInput, ServingError
from service.protocol_v2 import tensor_from_binary, tensor_to_bytes

log = logging.getLogger("modelserve.grpc")

# InferTensorContents field holding each V2 datatype when a client sends typed (not raw) contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _param_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _typed_contents(tensor: Any, shape: list[int]) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input {tensor.name!r}: {tensor.datatype} must be sent as raw_input_contents")
    values = list(getattr(tensor.contents, field))
    if tensor.datatype == "BYTES":
        arr = np.empty(len(values), dtype=object)
        arr[:] = values
    else:
        arr = np.asarray(values, dtype=numpy_dtype(tensor.datatype))
    if arr.size != int(np.prod(shape)):
        raise InvalidInput(f"input {tensor.name!r}: shape {shape} needs {int(np.prod(shape))} elements, got {arr.size}")
    return arr.reshape(shape)


def decode_infer(request: pb.ModelInferRequest) -> InferRequest:
    """A protocol-agnostic InferRequest from a ModelInferRequest (raw or typed contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; expected one per input")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        shape = [int(d) for d in tensor.shape]
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input {tensor.name!r}: shape {shape} has negative dimensions")
        numpy_dtype(tensor.datatype)  # raises with the list of valid datatypes
        if raw:
            inputs[tensor.name] = tensor_from_binary(memoryview(raw[i]), name=tensor.name, datatype=tensor.datatype,
                                                     shape=shape)
        else:
            inputs[tensor.name] = _typed_contents(tensor, shape)
    outputs = [
        RequestedOutput(o.name, True, int(_param_value(o.parameters["classification"]) or 0)
                        if "classification" in o.parameters else 0)
        for o in request.outputs
    ] or None
    params = {k: _param_value(v) for k, v in request.parameters.items()}
    return InferRequest(model_name=request.model_name, model_version=request.model_version or None,
                        inputs=inputs, outputs=outputs, id=request.id or None, parameters=params)


def encode_infer(resp: InferResponse) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id or "")
    for tensor in resp.outputs:
        out.outputs.add(name=tensor.name, datatype=v2_datatype(tensor.data), shape=list(tensor.data.shape))
        out.raw_output_contents.append(tensor_to_bytes(tensor.data))
    return out


def _serving_errors_to_status(method: Callable) -> Callable:
    """Answer a ServingError with its gRPC status code and message (the HTTP transport maps it to JSON)."""

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(exc.grpc_code, exc.message)

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService on the InferenceCore; method names are fixed by the service definition."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.core.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.core.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.core.server_metadata(), pb.ServerMetadataResponse())

    @_serving_errors_to_status
    async def ModelMetadata(self, request, context):
        meta = self.core.model_metadata(request.name, request.version or None)
        return json_format.ParseDict(meta, pb.ModelMetadataResponse())

    @_serving_errors_to_status
    async def ModelConfig(self, request, context):
        spec = self.core.repository.get(request.name, request.version or None).spec
        return pb.ModelConfigResponse(config=spec.config)

    @_serving_errors_to_status
    async def ModelStatistics(self, request, context):
        stats = self.core.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        rows = self.core.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    @_serving_errors_to_status
    async def RepositoryModelLoad(self, request, context):
        await self.core.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_serving_errors_to_status
    async def RepositoryModelUnload(self, request, context):
        await self.core.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @_serving_errors_to_status
    async def ModelInfer(self, request, context):
        return encode_infer(await self.core.infer(decode_infer(request)))


async def start_grpc_server(core: InferenceCore, *, host: str, port: int, max_message_bytes: int) -> grpc.aio.Server:
    """Start the gRPC server on the running event loop (it shares the core, batchers and models with HTTP)."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind the gRPC port {host}:{port}")
    await server.start()
    log.info("KServe V2 gRPC on %s:%d", host, bound)
    return server
