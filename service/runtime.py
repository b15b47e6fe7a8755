"""A model version's ONNX Runtime instances: one session each (from the shared session factory)."""

from __future__ import annotations

import logging
import queue
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.datatypes import V2_TO_NUMPY
from service.errors import BackendError, InvalidInput, ModelLoadError, ServingError
from service.iobinding import BoundRunner, on_gpu
from service.modelrepo.config import GraphTensor, graph_tensors, overridable_initializers
from service.modelrepo.sessions import create_session

log = logging.getLogger("modelserve.runtime")

# ONNX Runtime's exception types (pybind11), e.g. Gather's "indices element out of data bounds".
_ORT_INVALID_ARGUMENT = ort.capi.onnxruntime_pybind11_state.InvalidArgument
_ORT_FAIL = ort.capi.onnxruntime_pybind11_state.Fail
_INDEX = re.compile(r"idx=(-?\d+) must be within the inclusive range \[(-?\d+),(-?\d+)\]")
# Fail messages that only an input's values or sizes cause (a longer sequence than the position table).
_FAIL_BY_INPUT = ("out of data bounds", "out of range", "out of bounds", "Attempting to broadcast")


def _status_message(text: str) -> str:
    """ORT's own cause, without the node, the source path or the "[ONNXRuntimeError] : 2 : ..." prefix."""
    cause = text.split("Status Message:", 1)[-1]
    cause = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", cause)
    cause = re.sub(r"(/[\w.+-]+)+(:\d+)?", "", cause)  # absolute paths of ORT's sources or models
    cause = re.sub(r"\bvoid onnxruntime::\S+\([^)]*\)", "", cause)
    return " ".join(cause.split())[:200]


_ORT_ERRORS = (_ORT_INVALID_ARGUMENT, _ORT_FAIL, ort.capi.onnxruntime_pybind11_state.RuntimeException)


def classify_run_error(exc: Exception, *, model: str, feeds: dict[str, np.ndarray] | None = None) -> ServingError:
    """An error from session.run as what the client sees: 400 where the input's values caused it (checked
    conservatively on ORT's exception type and message, or an empty input in `feeds`), else 500 without ORT's
    internals."""
    text = str(exc)
    empty = next((name for name, arr in (feeds or {}).items() if arr.size == 0), None)
    if empty is not None and isinstance(exc, _ORT_ERRORS):
        # A graph that runs on other inputs fails on this one only for its empty dimension (ArgMax, Reshape, ...
        # over 0 elements; ORT's message is often empty): the client's input, not the server, is the cause.
        cause = _status_message(text)
        return InvalidInput(f"model {model!r}: the model cannot run on an empty input: input {empty!r} has shape "
                            f"{list((feeds or {})[empty].shape)}; expected at least one element in every "
                            f"dimension{f' ({cause})' if cause else ''}")
    index = _INDEX.search(text)
    if isinstance(exc, (_ORT_INVALID_ARGUMENT, _ORT_FAIL)) and index is not None:
        got, low, high = index.groups()
        return InvalidInput(f"model {model!r}: an index in the input is out of the model's range: {got} is not "
                            f"within [{low}, {high}] (e.g. a token id past the vocabulary)")
    if isinstance(exc, _ORT_FAIL) and "Attempting to broadcast" in text:
        return InvalidInput(f"model {model!r}: an input dimension is larger than the model supports (e.g. a sequence "
                            f"longer than its maximum length): {_status_message(text)}")
    if isinstance(exc, _ORT_INVALID_ARGUMENT) or (isinstance(exc, _ORT_FAIL) and any(
            s in text for s in _FAIL_BY_INPUT)):
        return InvalidInput(f"model {model!r}: the model rejected the input: {_status_message(text)}")
    log.error("model %s: inference failed: %s", model, text)
    return BackendError(f"model {model!r}: inference failed ({type(exc).__name__}); see the server log")


@dataclass(frozen=True)
class InstanceSetup:
    """How to create one instance: its model file (the FP16 variant on a GPU) and its providers."""

    model_path: Path
    providers: list[str]
    provider_options: list[dict[str, str]] = field(default_factory=list)
    shown_as: str | None = None


IO_BINDING_MODES = ("auto", "on", "off")  # auto: instances on a GPU provider


def _signature(session: ort.InferenceSession) -> list[tuple[str, str]]:
    inputs, outputs = graph_tensors(session)
    return [(t.name, t.datatype) for t in [*inputs, *outputs]]


def _check_same_signature(sessions: Sequence[ort.InferenceSession], setups: Sequence[InstanceSetup]) -> None:
    """Every instance must take and give the same tensors (an FP16 variant must keep FP32 I/O)."""
    first = _signature(sessions[0])
    for session, setup in zip(sessions[1:], setups[1:]):
        other = _signature(session)
        if other != first:
            raise ModelLoadError(f"instances disagree on inputs/outputs: {setups[0].shown_as} has {first}, "
                                 f"{setup.shown_as} has {other}")


class InstancePool:
    """One session per instance; `run` borrows an idle one, so at most `count` runs execute at once.

    ONNX Runtime releases the GIL inside `run`, so worker threads give real parallelism. With I/O binding
    (service/iobinding.py) each session comes with its runner and its preallocated buffers.
    """

    def __init__(self, setups: Sequence[InstanceSetup], *, intra_op_threads: int, allow_spinning: bool) -> None:
        if not setups:
            raise ValueError("an InstancePool needs at least one instance")
        self.path = setups[0].model_path
        self.count = len(setups)
        self.intra_op_threads = intra_op_threads
        self._idle: queue.SimpleQueue[tuple[ort.InferenceSession, BoundRunner | None]] = queue.SimpleQueue()
        self._closed = False
        sessions = [create_session(s.model_path, providers=s.providers, provider_options=s.provider_options,
                                   threads=intra_op_threads, allow_spinning=allow_spinning, shown_as=s.shown_as)
                    for s in setups]
        self.providers: list[str] = sessions[0].get_providers()
        self.graph_inputs, self.graph_outputs = graph_tensors(sessions[0])
        self.graph_optional = overridable_initializers(sessions[0])
        _check_same_signature(sessions, setups)
        self.bound = 0  # instances running through I/O binding
        for session in sessions:
            self._idle.put((session, None))

    def configure_io_binding(self, *, mode: str, max_batch_size: int) -> None:
        """Give each instance a BoundRunner (buffers for max_batch_size rows) where `mode` says: "on" every
        instance, "auto" those on a GPU provider, "off" none. Models with string inputs run unbound (ORT
        binds no string tensors). Call before serving: it takes every instance."""
        if mode not in IO_BINDING_MODES:
            raise ValueError(f"io_binding must be one of {IO_BINDING_MODES}, got {mode!r}")
        strings = any(t.datatype == "BYTES" for t in [*self.graph_inputs, *self.graph_optional])
        instances = [self._idle.get() for _ in range(self.count)]
        self.bound = 0
        for session, _ in instances:
            runner = None
            if not strings and (mode == "on" or (mode == "auto" and on_gpu(session))):
                runner = BoundRunner(session, inputs=self.graph_inputs, outputs=self.graph_outputs,
                                     max_rows=max_batch_size)
                self.bound += 1
            self._idle.put((session, runner))

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Blocking run on an idle session; call it from a worker thread."""
        idle = self._idle
        instance = idle.get()
        try:
            session, runner = instance
            return runner.run(feeds, output_names) if runner is not None else session.run(list(output_names), feeds)
        finally:
            if not self.closed:  # after close() a run still in progress lets its session go with it
                idle.put(instance)
            del instance

    @property
    def closed(self) -> bool:
        return self._closed

    def _take_all(self) -> list[tuple[ort.InferenceSession, BoundRunner | None]]:
        found = []
        while not self._idle.empty():
            found.append(self._idle.get())
        return found

    def sessions(self) -> list[ort.InferenceSession]:
        """The idle sessions (all of them when nothing runs); for inspection and tests."""
        found = self._take_all()
        for instance in found:
            self._idle.put(instance)
        return [session for session, _ in found]

    def runners(self) -> list[BoundRunner | None]:
        """The idle instances' I/O binding runners (None where unbound); for inspection and tests."""
        found = self._take_all()
        for instance in found:
            self._idle.put(instance)
        return [runner for _, runner in found]

    def close(self) -> None:
        """Drop every session reference, so ONNX Runtime frees the model now rather than at the next GC."""
        self._closed = True
        self._idle = queue.SimpleQueue()

    def warmup(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> None:
        """Run every instance once so the first real request does not pay for lazy initialisation."""
        instances = [self._idle.get() for _ in range(self.count)]
        try:
            for session, runner in instances:
                if runner is not None:
                    runner.run(dict(feeds), output_names)
                else:
                    session.run(list(output_names), feeds)
        finally:
            for instance in instances:
                self._idle.put(instance)


def synthetic_inputs(
    graph_inputs: Sequence[GraphTensor], *, batch_size: int, batched: bool
) -> dict[str, np.ndarray]:
    """Zero-filled inputs for warm-up (dynamic non-batch dims get 1)."""
    feeds = {}
    for t in graph_inputs:
        shape = [1 if d is None else d for d in t.shape]
        if batched and shape:
            shape[0] = batch_size
        dtype = V2_TO_NUMPY[t.datatype]
        if t.datatype == "BYTES":
            feeds[t.name] = np.full(shape, "", dtype=object)
        else:
            feeds[t.name] = np.zeros(shape, dtype=dtype)
    return feeds
