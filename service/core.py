"""The protocol-agnostic data plane: every transport parses, calls this, and serializes.

KServe V2 over HTTP (and any later transport) call the same methods, so they cannot drift.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service import __version__
from service.errors import InvalidInput, RequestCancelled, ServingError
from service.metrics import Metrics
from service.repository import ModelRepository

EXTENSIONS = ["classification", "binary_tensor_data", "model_repository", "statistics"]


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None
    class_count: int = 0


@dataclass
class InferRequest:
    model_name: str
    model_version: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict = field(default_factory=dict)
    # Tells whether the caller has gone away; checked before compute is spent on the request.
    client_gone: Callable[[], bool] | None = None


@dataclass
class OutputTensor:
    name: str
    data: np.ndarray
    binary: bool | None = None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


def classify(data: np.ndarray, *, k: int, labels: list[str] | None, batched: bool) -> np.ndarray:
    """Triton's classification extension: top-k "value:index[:label]" strings per batch row."""
    rows = data.reshape(data.shape[0], -1) if batched else data.reshape(1, -1)
    k = min(k, rows.shape[1])
    idx = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for j, i in enumerate(idx[r]):
            label = f":{labels[i]}" if labels and i < len(labels) else ""
            out[r, j] = f"{rows[r, i]:f}:{i}{label}".encode()
    return out if batched else out.reshape(k)


class InferenceCore:
    """Health, metadata, inference, repository and statistics operations."""

    def __init__(self, repository: ModelRepository, metrics: Metrics) -> None:
        self.repository = repository
        self.metrics = metrics

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when every model the repository knows is either loaded or was never asked to load."""
        return all(e.state != "LOADING" for e in self.repository.entries.values())

    def server_metadata(self) -> dict:
        return {"name": "modelserve", "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None) -> dict:
        mv = self.repository.get(name, version)
        spec = mv.spec
        versions = sorted(self.repository.entries[name].versions, key=int)
        return {
            "name": spec.name,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": [t.as_metadata(spec.max_batch_size) for t in spec.inputs],
            "outputs": [t.as_metadata(spec.max_batch_size) for t in spec.outputs],
        }

    def model_config(self, name: str, version: str | None) -> dict:
        return self.repository.get(name, version).spec.config_json()

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self.repository.get(name, version)
        except ServingError:
            return False
        return True

    async def infer(self, req: InferRequest) -> InferResponse:
        t0 = time.perf_counter_ns()
        mv = self.repository.get(req.model_name, req.model_version)
        try:
            # NOTE: lookup and submit happen without an await between them, so a reload cannot
            # close the version we picked before our request is queued on it.
            rows = mv.validate(req.inputs)
            selected = self._select_outputs(mv, req.outputs)
            assert mv.batcher is not None
            fut = mv.batcher.submit(inputs=req.inputs, rows=rows, timeout_s=mv.timeout_s(req.parameters),
                                    client_gone=req.client_gone)
            try:
                result = await fut
            except asyncio.CancelledError:
                raise RequestCancelled(f"model {mv.name!r}: client went away before the answer") from None
        except ServingError as exc:
            total = time.perf_counter_ns() - t0
            mv.stats.record_failure(total_ns=total, reason=exc.failure_reason)
            raise
        outputs = [self._output(mv, result.outputs, o) for o in selected]
        total = time.perf_counter_ns() - t0
        queue_ns = int(result.queue_s * 1e9)
        mv.stats.record_success(total_ns=total, queue_ns=queue_ns, timings=result.timings_ns)
        self.metrics.observe_request(mv.name, mv.version, total_s=total / 1e9, queue_s=result.queue_s,
                                     batch_rows=result.batch_rows)
        return InferResponse(model_name=mv.name, model_version=mv.version, outputs=outputs, id=req.id)

    @staticmethod
    def _select_outputs(mv, requested: list[RequestedOutput] | None) -> list[RequestedOutput]:
        if not requested:
            return [RequestedOutput(name) for name in mv.output_names]
        for o in requested:
            if mv.spec.output(o.name) is None:
                raise InvalidInput(
                    f"model {mv.name!r}: unknown output {o.name!r}; expected one of {mv.output_names}"
                )
        return requested

    @staticmethod
    def _output(mv, arrays: dict[str, np.ndarray], want: RequestedOutput) -> OutputTensor:
        data = arrays[want.name]
        if want.class_count > 0:
            data = classify(
                data, k=want.class_count, labels=mv.spec.labels.get(want.name), batched=mv.spec.max_batch_size > 0
            )
        return OutputTensor(want.name, data, want.binary)

    def repository_index(self, *, ready_only: bool = False) -> list[dict]:
        return self.repository.index(ready_only=ready_only)

    def _check_explicit(self, action: str) -> None:
        mode = self.repository.settings.model_control_mode
        if mode != "explicit":
            raise InvalidInput(
                f"cannot {action} models: model control mode is {mode!r}; start the server with "
                "--model-control-mode explicit to use the load/unload API"
            )

    async def load_model(self, name: str) -> None:
        self._check_explicit("load")
        await self.repository.load(name)

    async def unload_model(self, name: str) -> None:
        self._check_explicit("unload")
        await self.repository.unload(name)

    def statistics(self, name: str | None, version: str | None) -> dict:
        if name:
            entry = self.repository.entries.get(name)
            if entry is None:
                self.repository.get(name)  # raises ModelNotFound with the list of models
            assert entry is not None
            versions = [self.repository.get(name, version)] if version else list(entry.versions.values())
        else:
            versions = self.repository.ready_versions()
        return {"model_stats": [mv.stats.as_dict() for mv in versions]}
