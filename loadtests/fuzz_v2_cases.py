"""Hypothesis strategies for V2 infer requests, and their oracle (what a correct server answers).

A `Case` is a request in transport-neutral form: tensors as numpy arrays with the shape and datatype they
claim. `cases(specs)` draws valid ones and subtly invalid ones (a wrong datatype, a shape that disagrees with
the data or the model, a missing / unknown / duplicate / optional input, a batch too large, an unknown output,
request parameters of every type). `expected(case, spec)` decides what a correct server does with it, from the
model's config and an in-process ONNX Runtime run of the same model file: the outputs, or a 4xx.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
          "BYTES": np.object_}
# Request-level parameters drawn for every transport (HTTP-only ones such as binary_data_output are not:
# gRPC has no such parameter, so the same value may rightly be answered differently there).
PARAMETER_KEYS = ["priority", "timeout", "custom_key", "sequence_id", "sequence_start", "x"]
MUTATIONS = ["none"] * 6 + ["datatype", "unknown_datatype", "count", "shape", "rank", "batch", "missing", "unknown",
                            "duplicate", "output", "parameters"]


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dim; -1 variable
    optional: bool = False


@dataclass(frozen=True)
class Spec:
    """What the server's config says about a model, and the ONNX file to check its answers against."""

    name: str
    max_batch_size: int
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    path: Path
    strict: bool = True  # False: the server may refuse valid inputs (value checks of its own), never 5xx


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray  # BYTES: an object array of bytes


@dataclass
class Case:
    model: str
    tensors: list[Tensor]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    mutation: str = "none"


def spec_from_config(config: dict, *, path: Path, strict: bool = True) -> Spec:
    """A Spec from the server's JSON model config (GET /v2/models/{name}/config)."""
    def v2(t: dict) -> str:
        name = t["data_type"].removeprefix("TYPE_")
        return "BYTES" if name == "STRING" else name

    inputs = tuple(InputSpec(t["name"], v2(t), tuple(int(d) for d in t["dims"]), bool(t.get("optional")))
                   for t in config["input"])
    return Spec(config["name"], int(config.get("max_batch_size", 0)), inputs,
                tuple(t["name"] for t in config["output"]), path, strict)


def elements(datatype: str) -> st.SearchStrategy:
    if datatype == "BYTES":
        return st.text(max_size=6).map(str.encode)
    if datatype.startswith("FP"):
        width = {"FP16": 16, "FP32": 32, "FP64": 64}[datatype]
        # JSON carries no NaN / inf; within +-1e4 a sum's rounding (its order differs by batch) stays small.
        return st.floats(-1e4, 1e4, width=width, allow_nan=False, allow_infinity=False)
    return hnp.from_dtype(np.dtype(DTYPES[datatype]))


def values(draw: st.DrawFn, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        items = draw(st.lists(elements("BYTES"), min_size=prod(shape), max_size=prod(shape)))
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    return draw(hnp.arrays(DTYPES[datatype], shape, elements=elements(datatype)))


def _valid(draw: st.DrawFn, spec: Spec) -> Case:
    batched = spec.max_batch_size > 0
    batch = [draw(st.integers(1, min(3, spec.max_batch_size)))] if batched else []
    shared = {i: draw(st.integers(0, 3)) for i in range(8)}  # variable dims agree across inputs, as models need
    tensors = []
    for t in spec.inputs:
        if t.optional and draw(st.booleans()):
            continue
        shape = batch + [shared[i] if d < 0 else d for i, d in enumerate(t.dims)]
        tensors.append(Tensor(t.name, t.datatype, shape, values(draw, t.datatype, shape)))
    return Case(spec.name, tensors)


@st.composite
def cases(draw: st.DrawFn, specs: dict[str, Spec]) -> Case:
    """A request for one of `specs`: valid, or with one mutation a correct server refuses (or, for some
    parameters, may accept)."""
    spec = specs[draw(st.sampled_from(sorted(specs)))]
    case = _valid(draw, spec)
    case.mutation = draw(st.sampled_from(MUTATIONS))
    if not case.tensors and case.mutation not in ("unknown", "output", "parameters", "none"):
        case.mutation = "unknown"
    _mutate(draw, case, spec)
    return case


def _mutate(draw: st.DrawFn, case: Case, spec: Spec) -> None:
    m = case.mutation
    if m == "unknown":
        case.tensors.append(Tensor("no_such_input", "FP32", [1], np.ones(1, np.float32)))
        return
    if m == "output":
        case.outputs = draw(st.permutations([*spec.outputs, "no_such_output"]))
        return
    if m == "parameters":
        keys = draw(st.lists(st.sampled_from(PARAMETER_KEYS), min_size=1, max_size=3, unique=True))
        case.parameters = {k: draw(st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.text(max_size=8),
                                             st.floats(allow_nan=False, allow_infinity=False))) for k in keys}
        if "timeout" in case.parameters and not isinstance(case.parameters["timeout"], (bool, str)):
            case.parameters["timeout"] = 10**12  # a short one may rightly expire in the queue (a 503 race)
        return
    if m == "none":
        if spec.outputs and draw(st.booleans()):
            case.outputs = draw(st.lists(st.sampled_from(spec.outputs), min_size=1, unique=True))
        return
    i = draw(st.integers(0, len(case.tensors) - 1))
    t = case.tensors[i]
    if m == "datatype":
        other = draw(st.sampled_from([d for d in DTYPES if d != t.datatype]))
        case.tensors[i] = Tensor(t.name, other, t.shape, values(draw, other, t.shape))
    elif m == "unknown_datatype":
        t.datatype = draw(st.sampled_from(["FP8", "BF16", "STRING", "fp32", ""]))
    elif m == "count":
        t.shape = [*t.shape[:-1], t.shape[-1] + 1] if t.shape else [2]
    elif m == "shape":  # data and shape agree; the model expects another
        shape = [d + 1 for d in t.shape] if t.shape else [1]
        case.tensors[i] = Tensor(t.name, t.datatype, shape, values(draw, t.datatype, shape))
    elif m == "rank":
        shape = [*t.shape, 1]
        case.tensors[i] = replace(t, shape=shape, array=t.array.reshape(shape))
    elif m == "batch":
        if spec.max_batch_size > 0:
            shape = [spec.max_batch_size + 1, *t.shape[1:]]
            case.tensors[i] = Tensor(t.name, t.datatype, shape, values(draw, t.datatype, shape))
    elif m == "missing":
        del case.tensors[i]
    elif m == "duplicate":
        case.tensors.append(t)


def _fits(t: Tensor, spec: Spec) -> bool:
    want = next((s for s in spec.inputs if s.name == t.name), None)
    if want is None or want.datatype != t.datatype or t.array.size != prod(t.shape):
        return False
    dims = list(want.dims)
    shape = list(t.shape)
    if spec.max_batch_size > 0:
        if not shape or not 1 <= shape[0] <= spec.max_batch_size:
            return False
        shape = shape[1:]
    return len(shape) == len(dims) and all(d < 0 or d == s for d, s in zip(dims, shape))


def structurally_valid(case: Case, spec: Spec) -> bool:
    """What the config alone decides: names, datatypes, shapes, counts, batch size, outputs."""
    names = [t.name for t in case.tensors]
    if len(set(names)) != len(names) or not all(_fits(t, spec) for t in case.tensors):
        return False
    batches = {t.shape[0] for t in case.tensors} if spec.max_batch_size > 0 else set()
    if len(batches) > 1 or any(s.name not in names for s in spec.inputs if not s.optional):
        return False
    return case.outputs is None or set(case.outputs) <= set(spec.outputs)


_SESSIONS: dict[Path, ort.InferenceSession] = {}


def reference(case: Case, spec: Spec) -> dict[str, np.ndarray] | None:
    """ONNX Runtime's own answer for a structurally valid case (None when the model itself fails on it)."""
    session = _SESSIONS.get(spec.path)
    if session is None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 4  # quiet: the server logs its own errors; ORT would print every refused case
        session = _SESSIONS[spec.path] = ort.InferenceSession(str(spec.path), opts, providers=["CPUExecutionProvider"])
    # ORT takes str (not bytes) for string tensors.
    feeds = {t.name: (np.vectorize(bytes.decode, otypes=[object])(t.array) if t.array.dtype == object and t.array.size
                      else t.array).reshape(t.shape) for t in case.tensors}
    wanted = case.outputs or list(spec.outputs)
    try:
        outs = session.run(wanted, feeds)
    except Exception:  # ONNX Runtime's own errors: the server must refuse the same input with a 4xx
        return None
    return dict(zip(wanted, outs))


def expected(case: Case, spec: Spec) -> dict[str, np.ndarray] | None:
    """The outputs a correct server answers, or None when it must answer a 4xx."""
    if not structurally_valid(case, spec):
        return None
    return reference(case, spec)
