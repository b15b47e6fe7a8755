"""The protocol-agnostic data plane: every transport parses, calls this, and serializes.

KServe V2 over HTTP and gRPC and the task routes call the same methods, so they cannot drift. The core owns
the repository privately: no transport looks a model up by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from service import __version__
from service.classification import check_classifiable, classify
from service.errors import InvalidInput, ModelControlUnavailable, PayloadTooLarge, RequestCancelled, ServingError
from service.log_settings import LogSettings
from service.metrics import Metrics
from service.model import ModelVersion
from service.modelrepo import layout, overrides
from service.processing.base import Limits, Processor, setting
from service.processing.registry import build_processor, describe_model
from service.processing.text_input import text_input_name, text_metadata, tokenized
from service.repository import ModelRepository
from service.shm import SharedMemoryRegistry, ShmRef
from service.tracing import RequestTrace, Tracing

# Triton's extension names for what is served (its own list adds cuda_shared_memory).
# "parameters": custom request parameters of every type are taken (an ONNX graph reads none, as in Triton's
# onnxruntime backend); Triton's --http/--grpc-header-forward-pattern are not. "schedule_policy": a request's
# priority orders the dynamic batcher's queue (priority_levels) and its timeout is honoured where the queue
# policy allows the override; per-level queue policies (priority_queue_policy) are not read.
EXTENSIONS = ["classification", "sequence", "model_repository", "model_repository(unload_dependents)",
              "model_configuration", "binary_tensor_data", "statistics", "system_shared_memory", "trace", "logging",
              "parameters", "schedule_policy"]


@dataclass
class RequestedOutput:
    name: str
    class_count: int = 0
    # Where to write the output (system shared memory extension) instead of the response.
    shm: ShmRef | None = None


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
    # Set by the transport when this request is sampled for tracing (service/tracing.py).
    trace: RequestTrace | None = None


@dataclass
class OutputTensor:
    name: str
    data: np.ndarray
    shm: ShmRef | None = None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


@dataclass(slots=True)
class PendingInfer:
    """A request queued on its model (InferenceCore.submit); `future` resolves to its batch's result."""

    mv: ModelVersion
    req: InferRequest
    selected: list[RequestedOutput]
    t0: int
    future: asyncio.Future


@dataclass(frozen=True)
class TaskModel:
    """A task request's model, pinned for the request's whole life: one version and its processor."""

    version: ModelVersion
    processor: Processor


def _stop_if_gone(gone: Callable[[], bool], model: str) -> None:
    if gone():
        raise RequestCancelled(f"model {model!r}: client went away; the rest of its request was not computed")


def _prepare_all(processor: Processor, items: list[Any], gone: Callable[[], bool], model: str) -> list[Any]:
    """Request budget first (headers only), then each item, stopping at the first sign the caller left."""
    processor.admit(items)
    prepared = []
    for i, item in enumerate(items):
        _stop_if_gone(gone, model)
        prepared.append(processor.prepare(item, index=i))
    return prepared


class InferenceCore:
    """Health, metadata, inference, tasks, repository and statistics operations."""

    def __init__(self, repository: ModelRepository, metrics: Metrics) -> None:
        self._repository = repository
        self.metrics = metrics
        self.limits = Limits.from_settings(repository.settings)
        self.max_task_items = repository.settings.max_task_items
        # One processor per loaded version, rebuilt when the version is swapped (keyed by the version object).
        self._processors: dict[str, tuple[ModelVersion, Processor]] = {}
        self._shutting_down = False
        self.stopping = asyncio.Event()  # set with begin_shutdown: open gRPC streams stop reading (grpc_stream.py)
        # Also the most bytes any one tensor may need (a gRPC message is bounded by it too).
        self.max_request_bytes = repository.settings.max_request_bytes
        self.shm = SharedMemoryRegistry(allowed=repository.settings.allow_client_shm)
        self.tracing = Tracing(repository.settings)
        self.logging = LogSettings(level=repository.settings.log_level, verbose=repository.settings.log_verbose,
                                   log_format=repository.settings.log_format)
        repository.step_runner = self._run_step

    # ------------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Triton's server readiness: false once shutdown began; with strict readiness (the default) also
        until every model that should be loaded is READY (an empty repository in mode none/poll is not)."""
        if self._shutting_down:
            return False
        return self._repository.all_ready() if self._repository.settings.strict_readiness else True

    def begin_shutdown(self) -> None:
        """From now on the server reports not ready (requests already received are still answered)."""
        self._shutting_down = True
        self.stopping.set()
        self._repository.stop_polling()  # no model changes while the server drains

    def server_metadata(self) -> dict:
        return {"name": self._repository.settings.server_id, "version": __version__, "extensions": EXTENSIONS}

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        """The READY version asked for (latest if none): ModelNotFound / ModelNotReady with the reason."""
        return self._repository.get(name, version)

    @contextlib.contextmanager
    def arriving(self, name: str, version: str | None) -> Iterator[None]:
        """Counts, for an adaptive batcher, a request whose body is still being read: a batch-mate on its way.
        A name that does not resolve counts nowhere; infer() reports it."""
        try:
            batcher = self.model(name, version).batcher
        except ServingError:
            batcher = None
        if batcher is None or not batcher.adaptive:
            yield
            return
        batcher.announce()
        try:
            yield
        finally:
            batcher.withdraw()

    def model_metadata(self, name: str, version: str | None) -> dict:
        spec = self.model(name, version).spec
        versions = sorted(self._repository.entries[name].versions, key=int)
        inputs = [t.as_metadata(spec.max_batch_size) for t in spec.inputs]
        if (text := text_input_name(spec)) is not None:  # the alternative to the token inputs
            inputs.append(text_metadata(spec, text))
        return {
            "name": spec.name,
            "versions": versions,
            "platform": spec.config.platform or "onnxruntime_onnx",
            "inputs": inputs,
            "outputs": [t.as_metadata(spec.max_batch_size) for t in spec.outputs],
        }

    def model_config(self, name: str, version: str | None) -> mc.ModelConfig:
        return self.model(name, version).spec.config

    def served_config(self, name: str, version: str | None) -> mc.ModelConfig:
        """The model configuration answered to clients (Triton's normalized form, see ModelVersion)."""
        return self.model(name, version).served_config

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
        if pinned is None:
            mv = self.model(req.model_name, req.model_version)
            text = mv.text_input
            if text is not None and text in req.inputs:
                req = await self._tokenize(mv, req, text)  # tokenized for this version: it runs them
        else:
            mv = pinned
        pending = self._submit(mv, req)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await pending.future  # finish() reads the outcome (a cancelled wait cancels the future too)
        return self.finish(pending)

    def submit(self, req: InferRequest) -> PendingInfer | None:
        """As infer() up to the queue, without awaiting: finish() the result once its `future` is done. None
        when the request needs asynchronous work first (raw texts to tokenize): use infer() for it."""
        mv = self.model(req.model_name, req.model_version)
        text = mv.text_input
        if text is not None and text in req.inputs:
            return None
        return self._submit(mv, req)

    def _submit(self, mv: ModelVersion, req: InferRequest) -> PendingInfer:
        t0 = time.perf_counter_ns()
        try:
            # NOTE: lookup and submit happen without an await between them, so a reload cannot
            # close the version we picked before our request is queued on it.
            rows = mv.validate(req.inputs)
            selected = self._select_outputs(mv, req.outputs)
            fut = mv.submit(inputs=req.inputs, rows=rows, parameters=req.parameters, client_gone=req.client_gone)
        except ServingError as exc:
            mv.stats.record_failure(total_ns=time.perf_counter_ns() - t0, reason=exc.failure_reason)
            raise
        return PendingInfer(mv, req, selected, t0, cast(asyncio.Future, fut))

    def finish(self, pending: PendingInfer) -> InferResponse:
        """The response of a submitted request whose future is done; its ServingError (counted) otherwise."""
        mv, req = pending.mv, pending.req
        try:
            if pending.future.cancelled():
                raise RequestCancelled(f"model {mv.name!r}: client went away before the answer")
            result = pending.future.result()
            outputs = [self._output(mv, result.outputs, o) for o in pending.selected]
        except ServingError as exc:
            mv.stats.record_failure(total_ns=time.perf_counter_ns() - pending.t0, reason=exc.failure_reason)
            raise
        total = time.perf_counter_ns() - pending.t0
        queue_ns = int(result.queue_s * 1e9)
        mv.stats.record_success(total_ns=total, queue_ns=queue_ns, timings=result.timings_ns)
        if req.trace is not None:
            req.trace.batch(queue_ns=queue_ns, timings_ns=result.timings_ns, rows=result.batch_rows)
        self.metrics.observe_request(mv.name, mv.version, total_s=total / 1e9, queue_s=result.queue_s,
                                     batch_rows=result.batch_rows)
        return InferResponse(model_name=mv.name, model_version=mv.version, outputs=outputs, id=req.id)

    async def _tokenize(self, mv: ModelVersion, req: InferRequest, text: str) -> InferRequest:
        """A V2 request carrying raw texts: the model's token tensors, made as the task route makes them."""
        t0 = time.perf_counter_ns()
        try:
            if len(req.inputs) != 1:
                graph = ", ".join(repr(t.name) for t in mv.spec.inputs)
                raise InvalidInput(f"model {mv.name!r}: send either the BYTES input {text!r} alone or {graph}, "
                                   f"not both (got {sorted(req.inputs)})")
            processor = self._processor(mv)
            feeds = await asyncio.to_thread(tokenized, processor, name=text, array=req.inputs[text])
        except ServingError as exc:
            mv.stats.record_failure(total_ns=time.perf_counter_ns() - t0, reason=exc.failure_reason)
            raise
        return dataclasses.replace(req, inputs=feeds)

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
        seen: set[str] = set()
        for o in requested:
            if o.name in seen:
                # NOTE: Triton's HTTP and gRPC words differ; both are here so either's tests match.
                raise InvalidInput(f"Duplicate output name {o.name!r} is not allowed in a request "
                                   f"(output {o.name!r} already exists in request) to model {mv.name!r}; "
                                   "name each output once")
            seen.add(o.name)
            if o.name not in mv.output_names:  # the spec's outputs, in a list: no per-request search of specs
                raise InvalidInput(f"unexpected inference output '{o.name}' for model '{mv.name}': unknown "
                                   f"output; expected one of {mv.output_names}")
            if o.class_count > 0:
                datatype = next(t.datatype for t in mv.spec.outputs if t.name == o.name)
                check_classifiable(datatype, output=o.name, model=mv.name)
        return requested

    @staticmethod
    def _output(mv: ModelVersion, arrays: dict[str, np.ndarray], want: RequestedOutput) -> OutputTensor:
        data = arrays[want.name]
        if want.class_count > 0:
            data = classify(
                data, k=want.class_count, labels=mv.spec.labels.get(want.name), batched=mv.spec.max_batch_size > 0
            )
        return OutputTensor(want.name, data, want.shm)

    # ------------------------------------------------------------------ task endpoints

    def task_model(self, name: str) -> TaskModel:
        """The latest READY version of `name` with its processor; InvalidInput when it has no task endpoint."""
        mv = self.model(name)
        return TaskModel(mv, self._processor(mv))

    def _processor(self, mv: ModelVersion) -> Processor:
        """The processor of one loaded version, built once (the latest version's is cached per model)."""
        cached = self._processors.get(mv.name)
        if cached is None or cached[0] is not mv:
            cached = (mv, build_processor(mv.spec, model_dir=layout.model_dir(self._repository.root, mv.name),
                                          limits=self.limits))
            self._processors[mv.name] = cached
        return cached[1]

    async def predict(self, model: TaskModel, items: list[Any], params: dict, *,
                      client_gone: Callable[[], bool] | None = None,
                      check: Callable[[list[Any]], None] | None = None) -> list[dict]:
        """Prepare items (in a worker thread), infer them in chunks of max_batch_size, post-process.

        `client_gone` is checked between items and chunks: work for a caller who hung up stops there.
        `check` sees the prepared items before any inference and raises to refuse the request (the OpenAI route
        refuses a text the tokenizer would truncate, as OpenAI does, without a second tokenization).
        """
        processor, mv = model.processor, model.version
        if not items:
            raise InvalidInput(f"no items to predict; {processor.describe()['accepts']}")
        if len(items) > self.max_task_items:
            raise PayloadTooLarge(f"{len(items)} items in one request; send at most {self.max_task_items} "
                                  f"({setting('max_task_items')})")
        gone = client_gone or (lambda: False)
        prepared = await asyncio.to_thread(_prepare_all, processor, items, gone, mv.name)
        if check is not None:
            check(prepared)
        size = mv.spec.max_batch_size or len(prepared)
        bounded = processor.rows_per_run(prepared)
        step = min(size, bounded or size)
        if mv.ragged is not None:  # the batcher pads, groups by length and keeps the token bound: send unpadded
            step, bounded = 1, None
        chunks = [prepared[i:i + step] for i in range(0, len(prepared), step)]

        def run(chunk: list[Any]) -> Any:
            request = InferRequest(mv.name, mv.version, processor.collate(chunk), client_gone=client_gone)
            return self.infer(request, pinned=mv)

        _stop_if_gone(gone, mv.name)
        if bounded is None or bounded >= size:
            responses = await asyncio.gather(*(run(c) for c in chunks))
        else:
            # One run at a time, so the batcher cannot stack this request's runs back past the bound.
            responses = []
            for c in chunks:
                _stop_if_gone(gone, mv.name)
                responses.append(await run(c))
        results: list[dict] = []
        for chunk, resp in zip(chunks, responses):
            outputs = {o.name: np.asarray(o.data) for o in resp.outputs}
            results.extend(processor.postprocess(outputs, chunk, params=params))
        return results

    def embedding_model(self, name: str) -> tuple[TaskModel, int]:
        """A text-embedding model (pinned, as task_model) and its embedding width; InvalidInput naming the
        embedding models when `name` is another kind of model."""
        model = self.task_model(name)
        if model.processor.task != "text-embedding":
            embedders = [d["name"] for d in self.task_models() if d.get("task") == "text-embedding"]
            raise InvalidInput(f"model {name!r} is a {model.processor.task} model, not a text-embedding model; "
                               f"embedding models here: {embedders}")
        spec = model.version.spec
        out = spec.output(getattr(model.processor, "output_name", spec.outputs[0].name)) or spec.outputs[0]
        return model, int(out.dims[-1]) if out.dims else 0

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
            # NOTE: Triton's text (its tests match it) says "polling" for every non-explicit mode.
            raise ModelControlUnavailable(
                f"explicit model load / unload is not allowed if polling is enabled: cannot {action} models, "
                f"model control mode is {mode!r}; start the server with --model-control-mode explicit"
            )

    async def load_model(self, name: str, *, config: object | None = None,
                         files: dict[str, bytes] | None = None) -> None:
        """Load or reload `name`; `config` (JSON text) and `files` ("<version>/<path>" -> bytes) are Triton's
        load overrides, checked before anything is touched."""
        layout.check_model_name(name)
        self._check_explicit("load")
        override = overrides.parse_override(name, config=config, files=files or {})
        await self._repository.sync_remote()  # an object-storage repository: load what the bucket holds now
        await self._repository.load(name, override)

    async def unload_model(self, name: str, *, unload_dependents: bool = False) -> None:
        """Unload `name`; `unload_dependents` (Triton's unload parameter) also unloads the models an ensemble
        loaded along with it."""
        layout.check_model_name(name)
        self._check_explicit("unload")
        await self._repository.unload(name, unload_dependents=unload_dependents)

    def statistics(self, name: str | None, version: str | None) -> dict:
        if name:
            entry = self._repository.entries.get(name)
            if entry is None:
                self.model(name)  # raises ModelNotFound with the list of models
            assert entry is not None
            # As Triton: a model with no version loaded has no statistics to give (an error, not an empty list).
            versions = [self.model(name, version)] if version or not entry.versions else list(entry.versions.values())
        else:
            versions = self._repository.ready_versions()
        return {"model_stats": [mv.stats.as_dict() for mv in versions]}
