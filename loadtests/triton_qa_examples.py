"""tritonclient's example clients (src/python/examples) that loadtests/triton_qa.py runs unchanged, grouped by
the server they need (repository + flags), and those it does not run, with the reason.

Each case is one script run with the arguments Triton's own client tests give it; exit status 0 passes (with
"PASS" printed, where the script prints it).
Scripts in --examples-dir that are in neither list are reported as not run ("not in the harness's list").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtests import triton_qa_models as qm
from tests import triton_sequence_models as seq


@dataclass(frozen=True)
class ExampleGroup:
    name: str
    build: Callable[[Path], None]
    server_args: tuple[str, ...]
    cases: tuple[tuple[str, tuple[str, ...]], ...]  # (script, arguments)


def _simple_repo(repo: Path) -> None:
    qm.add_simple_models(repo)
    seq.simple_sequence(repo)
    seq.simple_dyna_sequence(repo)
    seq.simple_string_dyna_sequence(repo)


def _control_repo(total: int) -> Callable[[Path], None]:
    def build(repo: Path) -> None:
        qm.add_simple_models(repo)
        qm.add_fillers(repo, total=total)
    return build


GROUPS = (
    ExampleGroup("examples (simple models)", _simple_repo, ("--allow-client-shm", "true"), (
        ("simple_http_infer_client.py", ()), ("simple_grpc_infer_client.py", ()),
        ("simple_http_aio_infer_client.py", ()), ("simple_grpc_aio_infer_client.py", ()),
        ("simple_http_async_infer_client.py", ()), ("simple_grpc_async_infer_client.py", ()),
        ("simple_grpc_keepalive_client.py", ()), ("simple_grpc_custom_args_client.py", ()),
        ("simple_grpc_aio_keepalive_client.py", ()), ("simple_grpc_aio_custom_args_client.py", ()),
        ("grpc_explicit_int_content_client.py", ()), ("grpc_explicit_int8_content_client.py", ()),
        ("grpc_explicit_byte_content_client.py", ()),
        ("simple_http_health_metadata.py", ()), ("simple_grpc_health_metadata.py", ()),
        ("simple_http_aio_health_metadata.py", ()), ("simple_grpc_aio_health_metadata.py", ()),
        ("simple_http_string_infer_client.py", ()), ("simple_grpc_string_infer_client.py", ()),
        ("simple_grpc_aio_string_infer_client.py", ()), ("simple_http_aio_string_infer_client.py", ()),
        ("simple_grpc_aio_shm_client.py", ()), ("simple_http_aio_shm_client.py", ()),
        ("simple_grpc_shm_string_client.py", ()), ("simple_grpc_aio_shm_string_client.py", ()),
        ("simple_http_aio_shm_string_client.py", ()),
        ("simple_http_shm_client.py", ()), ("simple_grpc_shm_client.py", ()), ("simple_http_shm_string_client.py", ()),
        ("reuse_infer_objects_client.py", ()), ("reuse_infer_objects_client.py", ("-i", "grpc", "-u", "localhost:8001")),
        ("simple_grpc_sequence_stream_infer_client.py", ()), ("simple_grpc_sequence_stream_infer_client.py", ("-d",)),
        ("simple_grpc_aio_sequence_stream_infer_client.py", ()),
        ("simple_grpc_aio_sequence_stream_infer_client.py", ("-d",)),
        ("simple_http_sequence_sync_infer_client.py", ()), ("simple_http_sequence_sync_infer_client.py", ("-d",)),
        ("simple_grpc_sequence_sync_infer_client.py", ()), ("simple_grpc_sequence_sync_infer_client.py", ("-d",)),
        ("simple_http_aio_sequence_sync_infer_client.py", ()),
        ("simple_http_aio_sequence_sync_infer_client.py", ("-d",)),
        ("simple_grpc_aio_sequence_sync_infer_client.py", ()),
        ("simple_grpc_aio_sequence_sync_infer_client.py", ("-d",)),
    )),
    # The model-control examples count the repository (7 over HTTP, 8 over gRPC) and load/unload `simple`.
    ExampleGroup("examples (model control, HTTP)", _control_repo(7), ("--model-control-mode", "explicit"),
                 (("simple_http_model_control.py", ()), ("simple_http_aio_model_control.py", ()))),
    ExampleGroup("examples (model control, gRPC)", _control_repo(8), ("--model-control-mode", "explicit"),
                 (("simple_grpc_model_control.py", ()), ("simple_grpc_aio_model_control.py", ()))),
)

NOT_RUN = {
    "simple_http_cudashm_client.py": "CUDA shared memory (this server runs on host memory)",
    "simple_grpc_cudashm_client.py": "CUDA shared memory (this server runs on host memory)",
    "simple_http_aio_cudashm_client.py": "CUDA shared memory (this server runs on host memory)",
    "simple_grpc_aio_cudashm_client.py": "CUDA shared memory (this server runs on host memory)",
    "image_client.py": "needs Triton's image classification models (inception/densenet) and image files",
    "grpc_image_client.py": "needs Triton's image classification models (inception/densenet) and image files",
    "ensemble_image_client.py": "needs Triton's preprocess + densenet ensemble and image files",
    "memory_growth_test.py": "a long client-side leak soak, not a protocol check",
    "vllm_client.py": "needs a vLLM backend model",
    "grpc_client.py": "needs Triton's densenet_onnx model (an Inception input of 1x299x299x3)",
    "simple_grpc_custom_repeat.py": "needs the repeat_int32 decoupled python-backend model",
}
