"""A model version's ONNX Runtime instances: one session each (from the shared session factory)."""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.datatypes import V2_TO_NUMPY
from service.modelrepo.config import GraphTensor, graph_tensors, overridable_initializers
from service.modelrepo.sessions import create_session

log = logging.getLogger("modelserve.runtime")

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
        shown_as: str | None = None,
    ) -> None:
        self.path = model_path
        self.count = count
        self.providers: list[str] = []
        self._idle: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for _ in range(count):
            session = create_session(model_path, providers=providers, threads=intra_op_threads,
                                     allow_spinning=allow_spinning, shown_as=shown_as)
            self.providers = session.get_providers()
            self._idle.put(session)
        probe = self._idle.get()
        self.graph_inputs, self.graph_outputs = graph_tensors(probe)
        self.graph_optional = overridable_initializers(probe)
        self._idle.put(probe)

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
