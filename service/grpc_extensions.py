"""Triton's extension RPCs on gRPC: streaming inference, system shared memory, trace and log settings.

A mixin of InferenceServicer (service/grpc_app.py) so that the extensions live apart from the core V2 RPCs;
like them, each method only converts messages and calls the InferenceCore.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from service.core import InferenceCore
from service.errors import InvalidInput, ServingError
from service.grpc_stream import StreamShutdown, stream_infer
from service.protocol_grpc import Unparsable, grpc_status
from service.shm import cuda_region_missing, cuda_register_refused


def _aborts_on_serving_error(method: Callable) -> Callable:
    # NOTE: the same mapping as grpc_app's decorator, kept here so this mixin does not import grpc_app.
    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServingError as exc:
            await context.abort(grpc_status(exc), exc.message)

    return wrapper


def _log_value(value: pb.LogSettingsRequest.SettingValue) -> Any:
    which = value.WhichOneof("parameter_choice")
    return getattr(value, which) if which else None


def _log_message(values: dict[str, Any], message: Any) -> Any:
    for key, value in values.items():
        if isinstance(value, bool):
            message.settings[key].bool_param = value
        elif isinstance(value, int):
            message.settings[key].uint32_param = value
        else:
            message.settings[key].string_param = str(value)
    return message


def _trace_message(values: dict[str, Any]) -> pb.TraceSettingResponse:
    resp = pb.TraceSettingResponse()
    for key, value in values.items():
        resp.settings[key].value.extend(value if isinstance(value, list) else [value])
    return resp


class ExtensionServicer:
    """ModelStreamInfer, SystemSharedMemory*, CudaSharedMemory* (refused), TraceSetting and LogSettings."""

    core: InferenceCore

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest | Unparsable],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # NOTE: grpc.aio serves a stream from the method only when it is itself an async generator function.
        try:
            async for response in stream_infer(self.core, request_iterator):
                yield response
        except StreamShutdown as exc:  # UNAVAILABLE: retry elsewhere; what was not answered was not taken
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    @_aborts_on_serving_error
    async def SystemSharedMemoryStatus(self, request, context):
        resp = pb.SystemSharedMemoryStatusResponse()
        for region in self.core.shm.status(request.name or None):
            resp.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return resp

    @_aborts_on_serving_error
    async def SystemSharedMemoryRegister(self, request, context):
        self.core.shm.register(name=request.name, key=request.key, offset=request.offset, byte_size=request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_aborts_on_serving_error
    async def SystemSharedMemoryUnregister(self, request, context):
        self.core.shm.unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        # No CUDA region can ever be registered: none to list, none to unregister (Triton's answers then).
        if request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, cuda_region_missing(request.name))
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, cuda_register_refused(request.name))

    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    @_aborts_on_serving_error
    async def TraceSetting(self, request, context):
        model = request.model_name or None
        if model:
            self.core.model(model)  # ModelNotFound for an unknown model, as Triton
        changes = {k: list(v.value) for k, v in request.settings.items()}
        values = self.core.tracing.update(model, changes) if changes else self.core.tracing.settings(model)
        return _trace_message(values)

    @_aborts_on_serving_error
    async def LogSettings(self, request, context):
        changes = {k: _log_value(v) for k, v in request.settings.items()}
        if any(v is None for v in changes.values()):
            raise InvalidInput("every log setting needs a value (bool_param, uint32_param or string_param)")
        values = self.core.logging.update(changes) if changes else self.core.logging.get()
        return _log_message(values, pb.LogSettingsResponse())
