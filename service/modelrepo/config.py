"""Per-model configuration: Triton's config.pbtxt (ModelConfig protobuf), completed from the ONNX graph.

An existing Triton ONNX repository is served unchanged; a model with no config.pbtxt gets inputs, outputs,
dtypes, dynamic dimensions and max_batch_size inferred from its graph, as Triton's auto-complete does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

from google.protobuf import descriptor, json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.datatypes import config_to_v2, ort_to_v2, v2_to_config
from service.errors import InvalidInput, ModelLoadError
from service.modelrepo.accelerators import instance_plans
from service.modelrepo.layout import CONFIG_FILENAME, DEFAULT_MODEL_FILENAME, contained
from service.sequence_config import server_fed_names

# max_batch_size given to a model whose config sets none and whose graph batches.
DEFAULT_MAX_BATCH_SIZE = 32
_SUPPORTED_PLATFORMS = {"", "onnxruntime_onnx"}
_SUPPORTED_BACKENDS = {"", "onnxruntime"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as clients see it: dims exclude the batch dim when the model batches."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    # Triton's `reshape`: the graph's shape (batch dim excluded) when it differs from the served `dims`.
    reshape: tuple[int, ...] | None = None

    def as_metadata(self, max_batch_size: int) -> dict:
        shape = ([-1] if max_batch_size > 0 else []) + list(self.dims)
        return {"name": self.name, "datatype": self.datatype, "shape": shape}


@dataclass(frozen=True)
class BatchingPolicy:
    """Triton's dynamic_batching block, with its defaults."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 0  # 0: unbounded, as in Triton
    default_timeout_us: int = 0  # 0: no timeout
    allow_timeout_override: bool = False
    priority_levels: int = 0  # 0: one level; else 1 (served first) .. priority_levels
    default_priority_level: int = 0  # the level of a request that names none (or one out of range)

    def priority(self, asked: int) -> int:
        """A request's level, as Triton's InferenceRequest::SetPriority: 0 or above priority_levels means the
        default level; every request shares one level when the model has none."""
        if self.priority_levels <= 0:
            return 0
        return self.default_priority_level if asked <= 0 or asked > self.priority_levels else asked


@dataclass
class ModelSpec:
    """Everything the server needs to know about a model, derived once at load time."""

    name: str
    max_batch_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batching: BatchingPolicy | None
    instance_count: int
    instance_kind: str
    labels: dict[str, list[str]] = field(default_factory=dict)
    config: mc.ModelConfig = field(default_factory=mc.ModelConfig)
    model_filename: str = DEFAULT_MODEL_FILENAME

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class GraphTensor:
    """An ONNX graph input or output as ONNX Runtime reports it (None or a name for dynamic dims)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]

    @classmethod
    def from_node_arg(cls, arg) -> GraphTensor:
        shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or []))
        try:
            datatype = ort_to_v2(arg.type)
        except ValueError as exc:  # a load failure with its reason, not an unexpected one
            raise ModelLoadError(f"graph tensor {arg.name!r}: {exc}") from None
        return cls(name=arg.name, datatype=datatype, shape=shape)


def parse_config_text(text: str, *, where: str = CONFIG_FILENAME) -> mc.ModelConfig:
    """A ModelConfig from Triton's text format; ModelLoadError naming `where` when it does not parse."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{where}: not a valid Triton ModelConfig text proto: {exc}") from None
    return config


_INT64_TYPES = frozenset({descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64})


def _int64_as_numbers(message_desc: descriptor.Descriptor, doc: dict) -> dict:
    """proto3 JSON writes 64-bit integers as strings; Triton's config JSON has numbers (clients do arithmetic)."""
    for fd in message_desc.fields:
        value = doc.get(fd.name)
        if value is None:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.message_type is not None:
                for v in value.values():
                    _int64_as_numbers(value_fd.message_type, v)
            elif value_fd.cpp_type in _INT64_TYPES:
                doc[fd.name] = {k: int(v) for k, v in value.items()}
        elif fd.message_type is not None:
            for v in value if isinstance(value, list) else [value]:
                _int64_as_numbers(fd.message_type, v)
        elif fd.cpp_type in _INT64_TYPES:
            doc[fd.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return doc


def config_as_json(config: mc.ModelConfig) -> dict:
    """A ModelConfig as Triton's HTTP config route returns it: every field present (zeros and empty lists
    included, so `max_batch_size: 0` is there), field names as in the proto, 64-bit integers as numbers."""
    doc = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _int64_as_numbers(config.DESCRIPTOR, doc)


def read_config(model_dir: Path) -> tuple[mc.ModelConfig, bool, bool]:
    """Parse <model_dir>/config.pbtxt. Returns (config, file_exists, max_batch_size_was_given)."""
    path = model_dir / CONFIG_FILENAME
    config = mc.ModelConfig()
    if not path.exists():
        return config, False, False
    text = path.read_text()
    config = parse_config_text(text, where=f"{model_dir.name}/{CONFIG_FILENAME}")
    # NOTE: proto3 cannot tell "max_batch_size: 0" from absent, and the two mean different things.
    given = re.search(r"^\s*max_batch_size\s*:", text, flags=re.MULTILINE) is not None
    return config, True, given


def _graph_batches(tensors: Sequence[GraphTensor]) -> bool:
    return bool(tensors) and all(len(t.shape) >= 1 and t.shape[0] is None for t in tensors)


def _dims(shape: tuple[int | None, ...]) -> list[int]:
    return [-1 if d is None else d for d in shape]


def complete_config(
    config: mc.ModelConfig,
    *,
    name: str,
    graph_inputs: Sequence[GraphTensor],
    graph_outputs: Sequence[GraphTensor],
    max_batch_size_given: bool,
    default_max_batch_size: int,
    has_file: bool,
    graph_optional: Sequence[GraphTensor] = (),
) -> mc.ModelConfig:
    """Fill what the config leaves out from the graph (Triton's auto-complete), then check it against it.
    `graph_optional`: initializers a request may feed (ORT's overridable initializers); the config may list
    them as inputs (`optional: true` lets requests omit them), auto-complete leaves them out."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    if out.name and out.name != name:
        raise ModelLoadError(f"model {name!r}: config.pbtxt names it {out.name!r}; the name must match its folder")
    out.name = name
    if out.max_batch_size < 0:
        raise ModelLoadError(f"model {name!r}: max_batch_size {out.max_batch_size} is negative; expected 0 (no "
                             "batching) or a positive batch size")
    if out.platform not in _SUPPORTED_PLATFORMS or out.backend not in _SUPPORTED_BACKENDS:
        raise ModelLoadError(
            f"model {name!r}: platform {out.platform!r} / backend {out.backend!r} is not served here; "
            "expected platform 'onnxruntime_onnx' (or backend 'onnxruntime')"
        )
    out.platform = "onnxruntime_onnx"
    out.backend = "onnxruntime"
    if not max_batch_size_given:
        batches = _graph_batches(list(graph_inputs) + list(graph_outputs))
        out.max_batch_size = default_max_batch_size if batches else 0
        if batches and not has_file and not out.HasField("dynamic_batching"):
            out.dynamic_batching.SetInParent()
    strip = 1 if out.max_batch_size > 0 else 0
    # Sequence controls and implicit state are fed by the server, never by clients.
    fed_inputs, fed_outputs = server_fed_names(out)
    graph_inputs = [t for t in graph_inputs if t.name not in fed_inputs]
    graph_outputs = [t for t in graph_outputs if t.name not in fed_outputs]
    if not out.input:
        for t in graph_inputs:
            out.input.add(name=t.name, data_type=v2_to_config(t.datatype), dims=_dims(t.shape[strip:]))
    if not out.output:
        for t in graph_outputs:
            out.output.add(name=t.name, data_type=v2_to_config(t.datatype), dims=_dims(t.shape[strip:]))
    if not out.instance_group:
        out.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    if not out.HasField("version_policy"):
        out.version_policy.latest.num_versions = 1
    _check_against_graph(out, graph_inputs, "input", optional=graph_optional)
    _check_against_graph(out, graph_outputs, "output")
    return out


def _check_reshape(entry, where: str) -> list[int]:
    """The graph-side dims of a config entry: its `reshape` when given (element counts must agree), else dims."""
    if not entry.HasField("reshape"):
        return list(entry.dims)
    shape, dims = list(entry.reshape.shape), list(entry.dims)
    if -1 not in dims and -1 not in shape and prod(dims) != prod(shape):
        raise ModelLoadError(f"{where}: reshape {shape} holds {prod(shape)} elements, dims {dims} hold {prod(dims)}; "
                             "they must hold the same number")
    if (-1 in dims) != (-1 in shape) or dims.count(-1) > 1 or shape.count(-1) > 1:
        raise ModelLoadError(f"{where}: dims {dims} and reshape {shape} must both have one variable (-1) "
                             "dimension or neither")
    return shape


def _check_against_graph(config: mc.ModelConfig, graph: Sequence[GraphTensor], kind: str,
                         optional: Sequence[GraphTensor] = ()) -> None:
    by_name = {t.name: t for t in [*optional, *graph]}
    entries = config.input if kind == "input" else config.output
    strip = 1 if config.max_batch_size > 0 else 0
    for entry in entries:
        where = f"model {config.name!r} {kind} {entry.name!r}"
        dims = _check_reshape(entry, where)
        t = by_name.get(entry.name)
        if t is None:
            raise ModelLoadError(f"{where}: not in the ONNX graph, whose {kind}s are {sorted(by_name)}")
        if config_to_v2(entry.data_type) != t.datatype:
            raise ModelLoadError(
                f"{where}: config says {config_to_v2(entry.data_type)}, the graph has {t.datatype}"
            )
        if strip and (not t.shape or t.shape[0] is not None):
            raise ModelLoadError(
                f"{where}: max_batch_size {config.max_batch_size} needs a dynamic first dimension, "
                f"the graph has shape {_dims(t.shape)}"
            )
        graph_dims = t.shape[strip:]
        compatible = len(dims) == len(graph_dims) and all(
            g is None or d == g for d, g in zip(dims, graph_dims)
        )
        if not compatible:
            raise ModelLoadError(
                f"{where}: config {'reshape' if entry.HasField('reshape') else 'dims'} {dims} do not match the "
                f"graph's {_dims(graph_dims)} "
                f"(batch dim {'excluded' if strip else 'included'})"
            )
    if kind == "input":
        missing = {t.name for t in graph} - {e.name for e in entries}
        if missing:
            raise ModelLoadError(f"model {config.name!r}: graph inputs {sorted(missing)} are missing in config")


def _batching(config: mc.ModelConfig) -> BatchingPolicy | None:
    if config.max_batch_size <= 0 or not config.HasField("dynamic_batching"):
        return None
    db = config.dynamic_batching
    policy = db.default_queue_policy
    preferred = tuple(sorted(s for s in db.preferred_batch_size if s > 0))
    for size in preferred:
        if size > config.max_batch_size:
            raise ModelLoadError(
                f"model {config.name!r}: preferred_batch_size {size} exceeds max_batch_size {config.max_batch_size}"
            )
    levels, default_level = int(db.priority_levels), int(db.default_priority_level)
    if levels and not 1 <= default_level <= levels:
        # Triton refuses the same model config (model_config_utils.cc)
        raise ModelLoadError(f"model {config.name!r}: default_priority_level must be in range [1, {levels}] "
                             f"(priority_levels), got {default_level}")
    return BatchingPolicy(
        priority_levels=levels,
        default_priority_level=default_level,
        preferred_batch_sizes=preferred,
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        max_queue_size=int(policy.max_queue_size),
        default_timeout_us=int(policy.default_timeout_microseconds),
        allow_timeout_override=bool(policy.allow_timeout_override),
    )


def _labels(config: mc.ModelConfig, model_dir: Path) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {}
    for out in config.output:
        if out.label_filename:
            try:
                path = contained(model_dir, out.label_filename, what="label_filename")
            except InvalidInput as exc:
                raise ModelLoadError(f"model {config.name!r} output {out.name!r}: {exc.message}") from None
            if not path.is_file():
                raise ModelLoadError(f"model {config.name!r} output {out.name!r}: label file "
                                     f"{model_dir.name}/{out.label_filename} not found")
            labels[out.name] = [line.rstrip("\n") for line in path.read_text().splitlines()]
    return labels


def instance_settings(config: mc.ModelConfig) -> tuple[int, str]:
    """Total instance count (`count` per listed GPU, see accelerators.instance_plans) and kind (KIND_GPU,
    KIND_CPU or KIND_AUTO) from instance_group."""
    count = len(instance_plans(config))
    kinds = {mc.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group}
    kind = "KIND_GPU" if "KIND_GPU" in kinds else "KIND_CPU" if kinds == {"KIND_CPU"} else "KIND_AUTO"
    return count, kind


def build_spec(config: mc.ModelConfig, *, model_dir: Path) -> ModelSpec:
    """Turn a completed ModelConfig into the server's ModelSpec."""
    def specs(entries) -> list[TensorSpec]:
        return [
            TensorSpec(e.name, config_to_v2(e.data_type), tuple(int(d) for d in e.dims),
                       bool(getattr(e, "optional", False)),
                       tuple(int(d) for d in e.reshape.shape) if e.HasField("reshape") else None)
            for e in entries
        ]

    count, kind = instance_settings(config)
    return ModelSpec(
        name=config.name,
        max_batch_size=int(config.max_batch_size),
        inputs=specs(config.input),
        outputs=specs(config.output),
        batching=_batching(config),
        instance_count=count,
        instance_kind=kind,
        labels=_labels(config, model_dir),
        config=config,
        model_filename=config.default_model_filename or DEFAULT_MODEL_FILENAME,
    )


def select_versions(config: mc.ModelConfig, available: Sequence[int]) -> list[int]:
    """Apply the version policy (latest N / all / specific) to the versions found on disk."""
    ordered = sorted(available)
    which = config.version_policy.WhichOneof("policy_choice") if config.HasField("version_policy") else None
    if which == "all":
        return ordered
    if which == "specific":
        wanted = set(config.version_policy.specific.versions)
        missing = wanted - set(ordered)
        if missing:
            raise ModelLoadError(
                f"model {config.name!r}: version_policy asks for versions {sorted(missing)}, "
                f"found {ordered}"
            )
        return sorted(wanted)
    n = config.version_policy.latest.num_versions if which == "latest" else 1
    return ordered[-max(1, n):]


def graph_tensors(session) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The inputs and outputs of an ONNX Runtime session's graph."""
    return ([GraphTensor.from_node_arg(a) for a in session.get_inputs()],
            [GraphTensor.from_node_arg(a) for a in session.get_outputs()])


def overridable_initializers(session) -> list[GraphTensor]:
    """Initializers a request may feed: ONNX Runtime lists them apart from get_inputs()."""
    return [GraphTensor.from_node_arg(a) for a in session.get_overridable_initializers()]


def completed_spec(model_dir: Path, *, name: str, read: tuple[mc.ModelConfig, bool, bool],
                   graph_inputs: Sequence[GraphTensor], graph_outputs: Sequence[GraphTensor],
                   default_max_batch_size: int, graph_optional: Sequence[GraphTensor] = (),
                   auto_complete: bool = True) -> ModelSpec:
    """The spec of a model as served: its config.pbtxt (`read_config`) completed from its graph.
    `auto_complete=False` (Triton's --disable-auto-complete-config): the config must name the inputs and
    outputs itself, and an absent max_batch_size is 0 (no batching), not read from the graph."""
    config, has_file, max_batch_size_given = read
    if not auto_complete:
        require_complete(config, name=name, has_file=has_file, graph_inputs=graph_inputs,
                         graph_outputs=graph_outputs)
        max_batch_size_given = True
    completed = complete_config(config, name=name, graph_inputs=graph_inputs, graph_outputs=graph_outputs,
                                max_batch_size_given=max_batch_size_given,
                                default_max_batch_size=default_max_batch_size, has_file=has_file,
                                graph_optional=graph_optional)
    return build_spec(completed, model_dir=model_dir)


def require_complete(config: mc.ModelConfig, *, name: str, has_file: bool, graph_inputs: Sequence[GraphTensor],
                     graph_outputs: Sequence[GraphTensor]) -> None:
    """With auto-complete disabled, what Triton then needs from config.pbtxt (ModelLoadError naming it)."""
    where = f"model {name!r}: auto-complete is disabled (--disable-auto-complete-config / --strict-model-config)"
    if not has_file:
        raise ModelLoadError(f"{where} and there is no {CONFIG_FILENAME}; write one with max_batch_size, input "
                             f"{[t.name for t in graph_inputs]} and output {[t.name for t in graph_outputs]}")
    for kind, entries, graph in (("input", config.input, graph_inputs), ("output", config.output, graph_outputs)):
        if not entries and graph:
            raise ModelLoadError(f"{where}: {CONFIG_FILENAME} lists no {kind}; the graph has "
                                 f"{[t.name for t in graph]}")
