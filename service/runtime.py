"""ONNX Runtime sessions: one per model instance, providers TensorRT -> CUDA -> CPU as available."""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.config import GraphTensor
from service.datatypes import V2_TO_NUMPY
from service.errors import ModelLoadError

log = logging.getLogger("modelserve.runtime")

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


def choose_providers(*, requested: Sequence[str] | None, instance_kind: str) -> list[str]:
    """Providers to use, best first, keeping only those this onnxruntime build has."""
    available = ort.get_available_providers()
    wanted = list(requested) if requested else list(PREFERRED_PROVIDERS)
    unknown = [p for p in wanted if p not in available]
    if requested and unknown:
        log.warning("execution providers %s are not in this onnxruntime build (has %s)", unknown, available)
    chosen = [p for p in wanted if p in available]
    if instance_kind == "KIND_CPU":
        chosen = [p for p in chosen if p not in _GPU_PROVIDERS]
    if instance_kind == "KIND_GPU" and not any(p in _GPU_PROVIDERS for p in chosen):
        raise ModelLoadError(f"instance_group kind KIND_GPU needs a GPU provider; this build has {available}")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class InstancePool:
    """`count` sessions of one model; `run` borrows an idle one, so at most `count` runs execute at once.

    ONNX Runtime releases the GIL inside `run`, so worker threads give real parallelism.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        count: int,
        providers: Sequence[str],
        intra_op_threads: int,
        allow_spinning: bool,
    ) -> None:
        self.path = model_path
        self.count = count
        self.providers: list[str] = []
        self._idle: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for _ in range(count):
            session = self._new_session(providers, intra_op_threads, allow_spinning)
            self.providers = session.get_providers()
            self._idle.put(session)
        probe = self._idle.get()
        self.graph_inputs = [GraphTensor.from_node_arg(a) for a in probe.get_inputs()]
        self.graph_outputs = [GraphTensor.from_node_arg(a) for a in probe.get_outputs()]
        self._idle.put(probe)

    def _new_session(
        self, providers: Sequence[str], intra_op_threads: int, allow_spinning: bool
    ) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ModelLoadError(f"ONNX Runtime could not load {self.path}: {exc}") from exc

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Blocking run on an idle session; call it from a worker thread."""
        session = self._idle.get()
        try:
            return session.run(list(output_names), feeds)
        finally:
            self._idle.put(session)

    def warmup(self, feeds: dict[str, np.ndarray], output_names: Sequence[str]) -> None:
        """Run every session once so the first real request does not pay for lazy initialisation."""
        sessions = [self._idle.get() for _ in range(self.count)]
        try:
            for session in sessions:
                session.run(list(output_names), feeds)
        finally:
            for session in sessions:
                self._idle.put(session)


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
