"""GPU execution from config.pbtxt, spelled as Triton's onnxruntime backend spells it, turned into the
(providers, provider_options) ONNX Runtime takes: the one place that reads it.

    optimization { execution_accelerators { gpu_execution_accelerator [
      { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } } ] } }
    parameters { key: "cudnn_conv_algo_search" value: { string_value: "1" } }      # legacy CUDA keys
    instance_group [ { kind: KIND_GPU count: 2 gpus: [ 0, 1 ] } ]                 # 2 instances per GPU

Key names and value spellings follow triton-inference-server/onnxruntime_backend's README (its mapping table
from Triton keys to ORT's TensorRT EP options, its CUDA EP options and the deprecated model-level keys).
Everything is checked here, at load time, so a typo is a load error that names the key and what is valid
instead of an option ONNX Runtime ignores or a crash at the first request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tritonclient.grpc import model_config_pb2 as mc

from service.errors import ModelLoadError

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_PROVIDER_NAMES = (TENSORRT, CUDA)

# Triton key -> (ORT TensorRT EP option, value kind). precision_mode is handled apart (one key, two options).
_TRT_KEYS: dict[str, tuple[str, str]] = {
    "max_workspace_size_bytes": ("trt_max_workspace_size", "int"),
    **{k: (k, "int") for k in ("trt_max_partition_iterations", "trt_min_subgraph_size", "trt_dla_core",
                                "trt_builder_optimization_level", "trt_auxiliary_streams",
                                "trt_ep_context_embed_mode")},
    "int8_calibration_table_name": ("trt_int8_calibration_table_name", "str"),
    "int8_use_native_calibration_table": ("trt_int8_use_native_calibration_table", "bool"),
    **{k: (k, "bool") for k in ("trt_dla_enable", "trt_engine_cache_enable", "trt_dump_subgraphs",
                                 "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable",
                                 "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable", "trt_force_timing_cache",
                                 "trt_detailed_build_log", "trt_build_heuristics_enable", "trt_sparsity_enable",
                                 "trt_cuda_graph_enable", "trt_dump_ep_context_model")},
    **{k: (k, "str") for k in ("trt_engine_cache_path", "trt_engine_cache_prefix", "trt_timing_cache_path",
                                "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes",
                                "trt_profile_max_shapes", "trt_profile_opt_shapes", "trt_ep_context_file_path")},
}
_PRECISION_MODES = {"FP32": {}, "FP16": {"trt_fp16_enable": "True"},
                    "INT8": {"trt_int8_enable": "True"}}

# CUDA EP options a `name: "cuda"` accelerator may set (ORT's own names) -> value kind.
_CUDA_ENUMS = {
    "cudnn_conv_algo_search": ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"),
    "arena_extend_strategy": ("kNextPowerOfTwo", "kSameAsRequested"),
}
_CUDA_KEYS: dict[str, str] = {
    "gpu_mem_limit": "int", "tunable_op_max_tuning_duration_ms": "int",
    **{k: "bool" for k in ("do_copy_in_default_stream", "cudnn_conv_use_max_workspace", "cudnn_conv1d_pad_to_nc1d",
                           "enable_cuda_graph", "enable_skip_layer_norm_strict_mode", "use_tf32", "prefer_nhwc",
                           "use_ep_level_unified_stream", "tunable_op_enable", "tunable_op_tuning_enable")},
    **{k: "enum" for k in _CUDA_ENUMS},
}
# The deprecated model-level `parameters` keys (string_value), still honoured by Triton: numbers for the enums.
_LEGACY_CUDA = {"cudnn_conv_algo_search", "gpu_mem_limit", "arena_extend_strategy", "do_copy_in_default_stream"}

_BOOLS = {"1": "True", "true": "True", "True": "True", "0": "False", "false": "False", "False": "False"}


@dataclass(frozen=True)
class GpuOptions:
    """What a model's config asks of the GPU providers; `tensorrt` is None unless it names that accelerator."""

    cuda: dict[str, str] = field(default_factory=dict)
    tensorrt: dict[str, str] | None = None


@dataclass(frozen=True)
class InstancePlan:
    """One model instance: where it runs (KIND_GPU / KIND_CPU / KIND_AUTO) and on which GPU."""

    kind: str
    device_id: int = 0


def _value(*, where: str, key: str, kind: str, raw: str, choices: Sequence[str] = ()) -> str:
    """A config value checked against its kind, in the spelling ORT's Python bindings take."""
    text = raw.strip()
    if kind == "int":
        if not text.isdigit():
            raise ModelLoadError(f"{where}: {key!r} must be a non-negative integer, got {raw!r}")
        return str(int(text))
    if kind == "bool":
        if text not in _BOOLS:
            raise ModelLoadError(f"{where}: {key!r} must be 1/0 or true/false, got {raw!r}")
        return _BOOLS[text]
    if kind == "enum":
        if text.isdigit() and int(text) < len(choices):  # Triton's numeric spelling: 0, 1, 2
            return choices[int(text)]
        if text not in choices:
            numbered = ", ".join(f"{i} ({c})" for i, c in enumerate(choices))
            raise ModelLoadError(f"{where}: {key!r} must be one of {numbered}, got {raw!r}")
        return text
    if not text:
        raise ModelLoadError(f"{where}: {key!r} must not be empty")
    return text


def _tensorrt(params: Mapping[str, str], *, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, raw in sorted(params.items()):
        if key == "precision_mode":
            mode = raw.strip().upper()
            if mode not in _PRECISION_MODES:
                raise ModelLoadError(f"{where}: 'precision_mode' must be FP32, FP16 or INT8, got {raw!r}")
            options.update(_PRECISION_MODES[mode])
            continue
        if key not in _TRT_KEYS:
            raise ModelLoadError(f"{where}: unknown parameter {key!r}; expected one of "
                                 f"{', '.join(sorted([*_TRT_KEYS, 'precision_mode']))}")
        ort_key, kind = _TRT_KEYS[key]
        options[ort_key] = _value(where=where, key=key, kind=kind, raw=raw)
    return options


def _cuda(params: Mapping[str, str], *, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for key, raw in sorted(params.items()):
        if key not in _CUDA_KEYS:
            raise ModelLoadError(f"{where}: unknown parameter {key!r}; expected one of {', '.join(sorted(_CUDA_KEYS))}")
        options[key] = _value(where=where, key=key, kind=_CUDA_KEYS[key], raw=raw, choices=_CUDA_ENUMS.get(key, ()))
    return options


def gpu_options(config: mc.ModelConfig) -> GpuOptions:
    """The GPU provider options a config asks for; ModelLoadError naming the key and what is valid."""
    model = f"model {config.name!r}"
    cuda: dict[str, str] = {}
    for key in sorted(_LEGACY_CUDA & set(config.parameters)):
        raw = config.parameters[key].string_value
        cuda[key] = _value(where=f"{model} parameters", key=key, kind=_CUDA_KEYS[key], raw=raw,
                           choices=_CUDA_ENUMS.get(key, ()))
    tensorrt = None
    accelerators = config.optimization.execution_accelerators
    for cpu_acc in accelerators.cpu_execution_accelerator:
        raise ModelLoadError(f"{model}: cpu_execution_accelerator {cpu_acc.name!r} is not available here; "
                             "expected none (ONNX Runtime's CPU provider runs CPU instances)")
    for i, acc in enumerate(accelerators.gpu_execution_accelerator):
        where = f"{model} gpu_execution_accelerator {acc.name!r}"
        if acc.name == "tensorrt":
            tensorrt = {**(tensorrt or {}), **_tensorrt(acc.parameters, where=where)}
        elif acc.name == "cuda":
            cuda.update(_cuda(acc.parameters, where=where))
        else:
            raise ModelLoadError(f"{model}: gpu_execution_accelerator #{i} is named {acc.name!r}; "
                                 "expected 'tensorrt' or 'cuda'")
    return GpuOptions(cuda=cuda, tensorrt=tensorrt)


def instance_plans(config: mc.ModelConfig) -> list[InstancePlan]:
    """One plan per instance, as Triton places them: `count` instances on each GPU a KIND_GPU group lists
    (GPU 0 when it lists none), `count` instances for a KIND_CPU or KIND_AUTO group."""
    plans: list[InstancePlan] = []
    for i, group in enumerate(config.instance_group or [mc.ModelInstanceGroup()]):
        kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
        where = f"model {config.name!r} instance_group #{i}"
        kind = "KIND_AUTO" if kind == "KIND_MODEL" else kind  # KIND_MODEL: the backend places it, i.e. we do
        if group.count < 0:
            raise ModelLoadError(f"{where}: count must be >= 1, got {group.count}")
        gpus = list(group.gpus)
        if gpus and kind == "KIND_CPU":
            raise ModelLoadError(f"{where}: a KIND_CPU group cannot list gpus {gpus}; use KIND_GPU (or drop gpus)")
        if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
            raise ModelLoadError(f"{where}: gpus must be distinct device ids >= 0, got {gpus}")
        count = max(1, group.count)
        # NOTE: Triton's KIND_GPU without `gpus` means every visible GPU; without CUDA we cannot count them
        # here, so it means GPU 0 (list them to spread instances).
        for device in gpus or [0]:
            plans.extend(InstancePlan(kind=kind, device_id=device) for _ in range(count))
    return plans


def provider_plan(instance: InstancePlan, options: GpuOptions, *, available: Sequence[str],
                  requested: Sequence[str] | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """(providers, provider_options) for one instance, best first, as InferenceSession takes them.

    TensorRT only when the config names the `tensorrt` accelerator or `requested` lists it (as in Triton:
    engine builds take minutes and happen per input shape); KIND_CPU drops the GPU providers; KIND_GPU
    without any GPU provider in this onnxruntime build is a load error saying what to install.
    """
    default = ([TENSORRT] if options.tensorrt is not None else []) + [CUDA, CPU]
    wanted = list(requested) if requested else default
    chosen = [p for p in wanted if p in available]
    if instance.kind == "KIND_CPU":
        chosen = [p for p in chosen if p not in GPU_PROVIDER_NAMES]
    on_gpu = any(p in GPU_PROVIDER_NAMES for p in chosen)
    if instance.kind == "KIND_GPU" and not on_gpu:
        raise ModelLoadError(
            f"instance_group kind KIND_GPU needs {CUDA} or {TENSORRT}; this onnxruntime build has "
            f"{list(available)}{f' and the server allows {list(requested)}' if requested else ''}: install "
            "onnxruntime-gpu (pip install 'modelserve[gpu]') or use kind KIND_CPU")
    if on_gpu and options.tensorrt is not None and TENSORRT not in chosen:
        raise ModelLoadError(f"the config asks for the 'tensorrt' gpu_execution_accelerator; this onnxruntime "
                             f"build has {list(available)}: expected {TENSORRT} (onnxruntime-gpu with TensorRT)")
    if CPU not in chosen:
        chosen.append(CPU)
    device = {"device_id": str(instance.device_id)}
    per_provider = {TENSORRT: {**device, **(options.tensorrt or {})}, CUDA: {**device, **options.cuda}}
    return chosen, [per_provider.get(p, {}) for p in chosen]
