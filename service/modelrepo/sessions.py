"""The one ONNX Runtime session factory: providers, threads and options for the server, `predict`, the
optimization passes, the model builds and the benchmarks alike."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import onnxruntime as ort

from service.errors import ModelLoadError
from service.modelrepo.accelerators import GPU_PROVIDER_NAMES, GpuOptions, InstancePlan, provider_plan

log = logging.getLogger("modelserve.sessions")

GPU_PROVIDERS = frozenset(GPU_PROVIDER_NAMES)
CPU_ONLY = ("CPUExecutionProvider",)


def choose_providers(*, requested: Sequence[str] | None = None, instance_kind: str = "KIND_AUTO") -> list[str]:
    """Providers to use, best first, keeping only those this onnxruntime build has: the server's choice for
    one instance (service/modelrepo/accelerators.py: CUDA then CPU; TensorRT only when `requested`)."""
    available = ort.get_available_providers()
    unknown = [p for p in requested or [] if p not in available]
    if unknown:
        log.warning("execution providers %s are not in this onnxruntime build (has %s)", unknown, available)
    providers, _ = provider_plan(InstancePlan(kind=instance_kind), GpuOptions(), available=available,
                                 requested=requested)
    return providers


def session_options(*, threads: int = 0, allow_spinning: bool = False, quiet: bool = True) -> ort.SessionOptions:
    """Sequential execution, every graph optimization, `threads` intra-op threads (0: ORT's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        options.log_severity_level = 3
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


@cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN before the first GPU session, once.

    NOTE: `pip install onnxruntime-gpu[cuda,cudnn]` puts them in nvidia-* wheels the dynamic loader does
    not search; onnxruntime.preload_dlls (1.21+) loads them from there (or from a compatible torch). Where
    CUDA is installed system-wide it is not needed, and a failure here only means ORT looks on its own.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # best effort: ORT still searches the default library path itself
        log.warning("onnxruntime.preload_dlls failed (%s); relying on the system's CUDA libraries", exc)


def create_session(path: Path, *, providers: Sequence[str] = CPU_ONLY, threads: int = 0,
                   allow_spinning: bool = False, shown_as: str | None = None,
                   provider_options: Sequence[dict[str, str]] | None = None) -> ort.InferenceSession:
    """An InferenceSession on `path`; ModelLoadError (naming the file as `shown_as`) if ORT refuses it.
    `provider_options`: one dict per provider (service/modelrepo/accelerators.py builds them from config)."""
    options = session_options(threads=threads, allow_spinning=allow_spinning)
    if GPU_PROVIDERS.intersection(providers):
        preload_cuda_libraries()
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers),
                                    provider_options=list(provider_options) if provider_options else None)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
        where = shown_as or Path(path).name
        message = str(exc).replace(str(path), where)
        raise ModelLoadError(f"ONNX Runtime could not load {where}: {message}") from exc
