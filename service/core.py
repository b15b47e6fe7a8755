"""The protocol-agnostic data plane: every transport parses, calls this, and serializes.

KServe V2 over HTTP and gRPC and the task routes call the same methods, so they cannot drift. The core owns
the repository privately: no transport looks a model up by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from service import __version__
from service.errors import InvalidInput, PayloadTooLarge, RequestCancelled, ServingError
from service.metrics import Metrics
from service.model import ModelVersion
from service.modelrepo import layout
from service.processing.base import Processor
from service.processing.registry import build_processor, describe_model
from service.repository import ModelRepository

EXTENSIONS = ["classification", "binary_tensor_data", "model_repository", "statistics"]
# Items in one task request (images, texts, clips, user ids).
MAX_TASK_ITEMS = 1024


@dataclass
class RequestedOutput:
    name: str
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


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


@dataclass(frozen=True)
class TaskModel:
    """A task request's model, pinned for the request's whole life: one version and its processor."""

    version: ModelVersion
    processor: Processor


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
    """Health, metadata, inference, tasks, repository and statistics operations."""

    def __init__(self, repository: ModelRepository, metrics: Metrics) -> None:
        self._repository = repository
        self.metrics = metrics
        # One processor per loaded version, rebuilt when the version is swapped (keyed by the version object).
        self._processors: dict[str, tuple[ModelVersion, Processor]] = {}
        repository.step_runner = self._run_step

    # ------------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready when every model the repository knows is either loaded or was never asked to load."""
        return all(e.state != "LOADING" for e in self._repository.entries.values())

    def server_metadata(self) -> dict:
        return {"name": "modelserve", "version": __version__, "extensions": EXTENSIONS}

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        """The READY version asked for (latest if none): ModelNotFound / ModelNotReady with the reason."""
        return self._repository.get(name, version)

    def model_metadata(self, name: str, version: str | None) -> dict:
        spec = self.model(name, version).spec
        versions = sorted(self._repository.entries[name].versions, key=int)
        return {
            "name": spec.name,
            "versions": versions,
            "platform": spec.config.platform or "onnxruntime_onnx",
            "inputs": [t.as_metadata(spec.max_batch_size) for t in spec.inputs],
            "outputs": [t.as_metadata(spec.max_batch_size) for t in spec.outputs],
        }

    def model_config(self, name: str, version: str | None) -> mc.ModelConfig:
        return self.model(name, version).spec.config

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self.model(name, version)
        except ServingError:
            return False
        return True

    # ------------------------------------------------------------------ inference

    async def infer(self, req: InferRequest, *, pinned: ModelVersion | None = None) -> InferResponse:
        """Validate, queue on the model's batcher, await the batch, pick outputs. `pinned`: a version already
        chosen (a task request keeps the version its processor belongs to)."""
        t0 = time.perf_counter_ns()
        mv = pinned or self.model(req.model_name, req.model_version)
        try:
            # NOTE: lookup and submit happen without an await between them, so a reload cannot
            # close the version we picked before our request is queued on it.
            rows = mv.validate(req.inputs)
            selected = self._select_outputs(mv, req.outputs)
            fut = mv.submit(inputs=req.inputs, rows=rows, parameters=req.parameters, client_gone=req.client_gone)
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

    async def _run_step(self, model: str, version: str | None, inputs: dict[str, np.ndarray],
                        outputs: list[str], parameters: dict) -> dict[str, np.ndarray]:
        """One ensemble step: an ordinary inference on the composing model (its batcher, its statistics)."""
        resp = await self.infer(InferRequest(model, version, inputs, [RequestedOutput(o) for o in outputs],
                                             parameters=parameters))
        return {o.name: o.data for o in resp.outputs}

    @staticmethod
    def _select_outputs(mv: ModelVersion, requested: list[RequestedOutput] | None) -> list[RequestedOutput]:
        if not requested:
            return [RequestedOutput(name) for name in mv.output_names]
        for o in requested:
            if mv.spec.output(o.name) is None:
                raise InvalidInput(
                    f"model {mv.name!r}: unknown output {o.name!r}; expected one of {mv.output_names}"
                )
        return requested

    @staticmethod
    def _output(mv: ModelVersion, arrays: dict[str, np.ndarray], want: RequestedOutput) -> OutputTensor:
        data = arrays[want.name]
        if want.class_count > 0:
            data = classify(
                data, k=want.class_count, labels=mv.spec.labels.get(want.name), batched=mv.spec.max_batch_size > 0
            )
        return OutputTensor(want.name, data)

    # ------------------------------------------------------------------ task endpoints

    def task_model(self, name: str) -> TaskModel:
        """The latest READY version of `name` with its processor; InvalidInput when it has no task endpoint."""
        mv = self.model(name)
        cached = self._processors.get(name)
        if cached is None or cached[0] is not mv:
            cached = (mv, build_processor(mv.spec, model_dir=layout.model_dir(self._repository.root, name)))
            self._processors[name] = cached
        return TaskModel(mv, cached[1])

    async def predict(self, model: TaskModel, items: list[Any], params: dict) -> list[dict]:
        """Prepare items (in a worker thread), infer them in chunks of max_batch_size, post-process."""
        processor, mv = model.processor, model.version
        if not items:
            raise InvalidInput(f"no items to predict; {processor.describe()['accepts']}")
        if len(items) > MAX_TASK_ITEMS:
            raise PayloadTooLarge(f"{len(items)} items in one request; send at most {MAX_TASK_ITEMS}")
        prepared = await asyncio.to_thread(lambda: [processor.prepare(x, index=i) for i, x in enumerate(items)])
        size = mv.spec.max_batch_size or len(prepared)
        chunks = [prepared[i:i + size] for i in range(0, len(prepared), size)]
        responses = await asyncio.gather(*(
            self.infer(InferRequest(mv.name, mv.version, processor.collate(c)), pinned=mv) for c in chunks
        ))
        results: list[dict] = []
        for chunk, resp in zip(chunks, responses):
            outputs = {o.name: np.asarray(o.data) for o in resp.outputs}
            results.extend(processor.postprocess(outputs, chunk, params=params))
        return results

    def task_models(self) -> list[dict]:
        """`GET /v1/models`: every model with its task, inputs, labels, variants and state."""
        docs = []
        for name in sorted(self._repository.entries):
            spec = None
            processor: Processor | ServingError | None = None
            try:
                model = self.task_model(name)
                spec, processor = model.version.spec, model.processor
            except ServingError as exc:
                processor = exc
                loaded = self._repository.entries[name].latest()
                spec = loaded.spec if loaded is not None else None
            doc = describe_model(spec, name=name, model_dir=self._repository.root / name, processor=processor)
            doc["state"] = self._repository.entries[name].state
            docs.append(doc)
        by_parent: dict[str, list[dict]] = {}
        for d in docs:
            if d["parent"]:
                by_parent.setdefault(d["parent"], []).append({"name": d["name"], "variant": d["variant"]})
        for d in docs:
            d["variants"] = [{"name": d["name"], "variant": d["variant"]}, *by_parent.get(d["name"], [])]
        return docs

    # ------------------------------------------------------------------ repository and statistics

    def repository_index(self, *, ready_only: bool = False) -> list[dict]:
        return self._repository.index(ready_only=ready_only)

    def _check_explicit(self, action: str) -> None:
        mode = self._repository.settings.model_control_mode
        if mode != "explicit":
            raise InvalidInput(
                f"cannot {action} models: model control mode is {mode!r}; start the server with "
                "--model-control-mode explicit to use the load/unload API"
            )

    async def load_model(self, name: str) -> None:
        layout.check_model_name(name)
        self._check_explicit("load")
        await self._repository.load(name)

    async def unload_model(self, name: str) -> None:
        layout.check_model_name(name)
        self._check_explicit("unload")
        await self._repository.unload(name)

    def statistics(self, name: str | None, version: str | None) -> dict:
        if name:
            entry = self._repository.entries.get(name)
            if entry is None:
                self.model(name)  # raises ModelNotFound with the list of models
            assert entry is not None
            versions = [self.model(name, version)] if version else list(entry.versions.values())
        else:
            versions = self._repository.ready_versions()
        return {"model_stats": [mv.stats.as_dict() for mv in versions]}
