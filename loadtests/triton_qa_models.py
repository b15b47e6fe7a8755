"""The model repositories Triton's QA tests expect, written by our own ONNX builders.

Triton's QA builds its repositories with gen_qa_*_models.py (TensorFlow, PyTorch, python backend ...). The tests
only see names, configs and behaviour, so each model here is the smallest ONNX graph that behaves as the test
expects, under the name and config the test asks for:

    onnx_zero_<n>_<dtype>            identity, n inputs INPUT<i> -> OUTPUT<i>, dims [-1], max_batch_size 8
    onnx_zero_1_float16              identity FP16 with dims [-1, -1] (the "two variable dims" raw-binary case)
    onnx_zero_1_object_1_element     BYTES identity with dims [1]
    onnx_zero_1_float32_queue        onnx_zero_1_float32 with a 1 s batching delay and max_queue_size 1
    simple, simple_string, simple_int8, simple_identity, simple_identity_int64   Triton's example models
    string_identity                  BYTES identity without batching (L0_grpc)
    input_all_required / input_optional / input_all_optional        sum of the given inputs -> OUTPUT0 [1]
    pt_identity                      FP32 identity, dims [8], max_batch_size 8 (TorchScript in Triton's QA)
    onnx[_nobatch]_<in>_<out0>_<out1>   L0_infer's "addsub" models (gen_qa_models.py's names, dims [16],
                                     max_batch_size 8 or 0, OUTPUT0 labels label0..label15, versions below)
    {simple,sequence,fan}_onnx[_nobatch]_...   L0_infer's ensembles over them, and the nop_<TYPE>_-1 they call
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.triton_models import add_sub_onnx, add_sub_string_onnx, identity_onnx, model_bytes, save_model, simple_config

ONNX_TYPES = {"float32": (TensorProto.FLOAT, "TYPE_FP32"), "float16": (TensorProto.FLOAT16, "TYPE_FP16"),
              "object": (TensorProto.STRING, "TYPE_STRING"), "int64": (TensorProto.INT64, "TYPE_INT64"),
              "int32": (TensorProto.INT32, "TYPE_INT32"),
              "int16": (TensorProto.INT16, "TYPE_INT16"), "int8": (TensorProto.INT8, "TYPE_INT8")}


def _io_block(kind: str, names: list[str], data_type: str, dims: str, *, optional: tuple[str, ...] = ()) -> str:
    rows = [f'  {{ name: "{n}" data_type: {data_type} dims: [ {dims} ]{" optional: true" if n in optional else ""} }}'
            for n in names]
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def identity_n_onnx(count: int, dtype: int, dims: list) -> bytes:
    """`count` independent identities INPUT<i> -> OUTPUT<i>."""
    ins = [helper.make_tensor_value_info(f"INPUT{i}", dtype, ["N", *dims]) for i in range(count)]
    outs = [helper.make_tensor_value_info(f"OUTPUT{i}", dtype, ["N", *dims]) for i in range(count)]
    nodes = [helper.make_node("Identity", [f"INPUT{i}"], [f"OUTPUT{i}"]) for i in range(count)]
    return model_bytes(helper.make_graph(nodes, "identity_n", ins, outs))


def zero_model(repo: Path, *, name: str, count: int, dtype: str, dims: str = "-1", extra: str = "") -> None:
    """Triton's qa_identity_model_repository model `onnx_zero_<count>_<dtype>` (batching, max 8)."""
    onnx_type, config_type = ONNX_TYPES[dtype]
    graph_dims = [f"D{i}" if d.strip() == "-1" else int(d) for i, d in enumerate(dims.split(","))]
    names = [f"INPUT{i}" for i in range(count)]
    config = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
              + _io_block("input", names, config_type, dims)
              + _io_block("output", [f"OUTPUT{i}" for i in range(count)], config_type, dims) + extra)
    save_model(repo / name, identity_n_onnx(count, onnx_type, graph_dims), config)


QUEUE_POLICY = """dynamic_batching {
    max_queue_delay_microseconds: 1000000
    preferred_batch_size: [ 8 ]
    default_queue_policy {
        max_queue_size: 1
    }
}
"""


def add_identity_models(repo: Path) -> None:
    """The identity models L0_http's test.sh copies into its repository."""
    zero_model(repo, name="onnx_zero_1_float32", count=1, dtype="float32")
    zero_model(repo, name="onnx_zero_1_object", count=1, dtype="object")
    zero_model(repo, name="onnx_zero_1_float16", count=1, dtype="float16", dims="-1, -1")
    zero_model(repo, name="onnx_zero_3_float32", count=3, dtype="float32")
    zero_model(repo, name="onnx_zero_1_object_1_element", count=1, dtype="object", dims="1")
    zero_model(repo, name="onnx_zero_1_float32_queue", count=1, dtype="float32", extra=QUEUE_POLICY)


def add_simple_models(repo: Path) -> None:
    """Triton's example models: simple (INT32 add/sub), simple_string, simple_int8, simple_identity (BYTES),
    simple_identity_int64, string_identity."""
    save_model(repo / "simple", add_sub_onnx(), simple_config("simple", "TYPE_INT32"))
    save_model(repo / "simple_string", add_sub_string_onnx(), simple_config("simple_string", "TYPE_STRING"))
    save_model(repo / "simple_int8", add_sub_onnx(dtype=TensorProto.INT8), simple_config("simple_int8", "TYPE_INT8"))
    for name, dtype, batch in (("simple_identity", "object", 8), ("simple_identity_int64", "int64", 8),
                               ("string_identity", "object", 0)):
        onnx_type, config_type = ONNX_TYPES[dtype]
        config = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {batch}\n'
                  + _io_block("input", ["INPUT0"], config_type, "-1")
                  + _io_block("output", ["OUTPUT0"], config_type, "-1"))
        save_model(repo / name, identity_onnx(onnx_type, ["N", "L"] if batch else ["L"]), config)


def summing_onnx(required: list[str], optional: list[str]) -> bytes:
    """OUTPUT0 [1] = the sum of every element of every input; `optional` inputs are zero initializers that a
    request may override (how an ONNX graph has inputs a request may leave out)."""
    names = [*required, *optional]
    # An initializer is overridable only when it is also a graph input (ONNX IR >= 4).
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [f"L{i}"]) for i, n in enumerate(names)]
    inits = [numpy_helper.from_array(np.zeros(1, dtype=np.float32), n) for n in optional]
    nodes = [helper.make_node("ReduceSum", [n], [f"s{i}"], keepdims=1) for i, n in enumerate(names)]
    nodes.append(helper.make_node("Sum", [f"s{i}" for i in range(len(names))], ["OUTPUT0"]))
    out = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [1])
    return model_bytes(helper.make_graph(nodes, "summing", ins, [out], inits))


def add_input_validation_models(repo: Path) -> None:
    """L0_input_validation's models (python backend in Triton) and pt_identity (TorchScript there)."""
    for name, required, optional in (("input_all_required", ["INPUT0", "INPUT1", "INPUT2"], []),
                                     ("input_optional", ["INPUT0", "INPUT1", "INPUT2"], ["INPUT3"]),
                                     ("input_all_optional", [], ["INPUT0", "INPUT1", "INPUT2"])):
        config = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\n'
                  + _io_block("input", [*required, *optional], "TYPE_FP32", "-1", optional=tuple(optional))
                  + _io_block("output", ["OUTPUT0"], "TYPE_FP32", "1")
                  + "instance_group [{ kind: KIND_CPU }]\n")
        save_model(repo / name, summing_onnx(required, optional), config)
    config = ('name: "pt_identity"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
              + _io_block("input", ["INPUT0"], "TYPE_FP32", "8") + _io_block("output", ["OUTPUT0"], "TYPE_FP32", "8"))
    save_model(repo / "pt_identity", identity_onnx(TensorProto.FLOAT, ["N", 8]), config)


def add_fillers(repo: Path, *, total: int) -> None:
    """Copies of `simple` until the repository holds `total` models (the aio tests count the index)."""
    present = sum(1 for p in repo.iterdir() if p.is_dir())
    for i in range(total - present):
        name = f"simple_copy_{i}"
        save_model(repo / name, add_sub_onnx(), simple_config(name, "TYPE_INT32"))


# L0_infer's addsub models as gen_qa_models.py's create_fixed_models lists them: (input, output0, output1) and
# the version policy. A model with a policy has versions 1 (sum, difference) and 2, 3 (swapped: OUTPUT0 = difference,
# OUTPUT1 = sum); one without has version 1 only -- what infer_test.py's `swap` flags expect of the latest version.
ADDSUB_MODELS: tuple[tuple[str, str, str, str], ...] = (
    ("int8", "int8", "int8", "latest { num_versions: 1 }"), ("int16", "int16", "int16", "latest { num_versions: 2 }"),
    ("int32", "int32", "int32", "all { }"), ("int64", "int64", "int64", ""),
    ("float16", "float16", "float16", "specific { versions: [ 1 ] }"),
    ("float32", "float32", "float32", "specific { versions: [ 1, 3 ] }"),
    ("float16", "float32", "float32", ""), ("int32", "int8", "int8", ""), ("int8", "int32", "int32", ""),
    ("int32", "int8", "int16", ""), ("int32", "float32", "float32", ""), ("float32", "int32", "int32", ""),
    ("int32", "float16", "int16", ""), ("object", "int32", "int32", ""), ("object", "object", "object", ""),
    ("object", "int32", "object", ""), ("object", "object", "int32", ""), ("int32", "object", "object", ""),
    ("int32", "int32", "object", ""), ("int32", "object", "int32", ""))
# ONNX Runtime's CPU Add/Sub have no INT8/INT16/FP16/STRING kernels: compute in INT32 (FP32 for FP16) and cast.
_COMPUTE = {"int8": TensorProto.INT32, "int16": TensorProto.INT32, "object": TensorProto.INT32,
            "float16": TensorProto.FLOAT}


def addsub_onnx(dtypes: tuple[str, str, str], *, batch: bool, swap: bool, size: int = 16) -> bytes:
    """OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1 (swapped when `swap`), each cast to its dtype."""
    shape = (["N"] if batch else []) + [size]
    in_type = ONNX_TYPES[dtypes[0]][0]
    compute = _COMPUTE.get(dtypes[0], in_type)
    nodes = [helper.make_node("Cast", [f"INPUT{i}"], [f"c{i}"], to=compute) for i in (0, 1)]
    nodes += [helper.make_node("Add", ["c0", "c1"], ["sum"]), helper.make_node("Sub", ["c0", "c1"], ["diff"])]
    results = ("diff", "sum") if swap else ("sum", "diff")
    nodes += [helper.make_node("Cast", [results[i]], [f"OUTPUT{i}"], to=ONNX_TYPES[dtypes[i + 1]][0]) for i in (0, 1)]
    ins = [helper.make_tensor_value_info(f"INPUT{i}", in_type, shape) for i in (0, 1)]
    outs = [helper.make_tensor_value_info(f"OUTPUT{i}", ONNX_TYPES[dtypes[i + 1]][0], shape) for i in (0, 1)]
    return model_bytes(helper.make_graph(nodes, "addsub", ins, outs))


def add_infer_models(repo: Path, *, size: int = 16, only: tuple[tuple[str, str, str], ...] = ()) -> None:
    """L0_infer's ONNX models: `onnx_<in>_<out0>_<out1>` (max_batch_size 8) and `onnx_nobatch_...` (0); `only`
    keeps just those dtype triples."""
    for in_dt, out0_dt, out1_dt, policy in ADDSUB_MODELS:
        if only and (in_dt, out0_dt, out1_dt) not in only:
            continue
        for batch in (True, False):
            name = f"onnx{'' if batch else '_nobatch'}_{in_dt}_{out0_dt}_{out1_dt}"
            config = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {8 if batch else 0}\n'
                      + (f"version_policy: {{ {policy} }}\n" if policy else "")
                      + _io_block("input", ["INPUT0", "INPUT1"], ONNX_TYPES[in_dt][1], str(size))
                      + f'output [\n  {{ name: "OUTPUT0" data_type: {ONNX_TYPES[out0_dt][1]} dims: [ {size} ] '
                      f'label_filename: "output0_labels.txt" }},\n'
                      f'  {{ name: "OUTPUT1" data_type: {ONNX_TYPES[out1_dt][1]} dims: [ {size} ] }}\n]\n')
            for version in (1, 2, 3) if policy else (1,):
                save_model(repo / name, addsub_onnx((in_dt, out0_dt, out1_dt), batch=batch, swap=version > 1),
                           config, version=version)
            (repo / name / "output0_labels.txt").write_text("".join(f"label{i}\n" for i in range(size)))


def _ensemble_config(name: str, *, batch: bool, dtypes: tuple[str, str, str], policy: str, labels: bool,
                     steps: list[tuple[str, dict[str, str], dict[str, str]]], size: int = 16) -> str:
    """gen_ensemble_model_utils' addsub ensemble: the addsub model's inputs/outputs, `steps` as (model,
    input_map, output_map) with model_version -1."""
    label = ' label_filename: "output0_labels.txt"' if labels else ""
    types = [ONNX_TYPES[d][1] for d in dtypes]
    text = (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {8 if batch else 0}\n'
            + (f"version_policy: {{ {policy} }}\n" if policy else "")
            + _io_block("input", ["INPUT0", "INPUT1"], types[0], str(size))
            + f'output [\n  {{ name: "OUTPUT0" data_type: {types[1]} dims: [ {size} ]{label} }},\n'
            f'  {{ name: "OUTPUT1" data_type: {types[2]} dims: [ {size} ] }}\n]\nensemble_scheduling {{ step [\n')
    rows = []
    for model, ins, outs in steps:
        maps = "".join(f' input_map {{ key: "{k}" value: "{v}" }}' for k, v in ins.items())
        maps += "".join(f' output_map {{ key: "{k}" value: "{v}" }}' for k, v in outs.items())
        rows.append(f'  {{ model_name: "{model}" model_version: -1{maps} }}')
    return text + ",\n".join(rows) + "\n] }\n"


def _nop(repo: Path, dtype: str) -> str:
    """Triton's `nop_<TYPE>_-1` (identity backend there): INPUT0/INPUT1 -> OUTPUT0/OUTPUT1, dims [-1], batching."""
    onnx_type, config_type = ONNX_TYPES[dtype]
    name = f"nop_{config_type}_-1"
    if not (repo / name).exists():
        config = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 1024\n'
                  + _io_block("input", ["INPUT0", "INPUT1"], config_type, "-1")
                  + _io_block("output", ["OUTPUT0", "OUTPUT1"], config_type, "-1"))
        save_model(repo / name, identity_n_onnx(2, onnx_type, ["L"]), config)
    return name


def add_infer_ensembles(repo: Path, *, size: int = 16, only: tuple[tuple[str, str, str], ...] = ()) -> None:
    """The simple_/sequence_/fan_ ensembles over each addsub model (ENSEMBLES=1), with the nop models they call;
    fan_ carries its own OUTPUT0 labels, the others take the addsub model's (gen_ensemble_model_utils.py)."""
    same = {"INPUT0": "INPUT0", "INPUT1": "INPUT1"}
    for in_dt, out0_dt, out1_dt, policy in ADDSUB_MODELS:
        dtypes = (in_dt, out0_dt, out1_dt)
        if only and dtypes not in only:
            continue
        kinds = ["simple"] + (["sequence"] if in_dt != "object" else []) + (["fan"] if "object" not in dtypes else [])
        for batch in (True, False):
            suffix = f"{'' if batch else '_nobatch'}_{in_dt}_{out0_dt}_{out1_dt}"
            base = f"onnx{suffix}"
            for kind in kinds:
                if kind == "simple":
                    steps = [(base, same, {"OUTPUT0": "OUTPUT0", "OUTPUT1": "OUTPUT1"})]
                else:
                    steps = [(_nop(repo, in_dt), same, {"OUTPUT0": "same_input0", "OUTPUT1": "same_input1"}),
                             (base, {"INPUT0": "same_input0", "INPUT1": "same_input1"},
                              {"OUTPUT0": "OUTPUT0", "OUTPUT1": "OUTPUT1"} if kind == "sequence"
                              else {"OUTPUT0": "same_output0", "OUTPUT1": "same_output1"})]
                if kind == "fan":
                    steps += [(_nop(repo, out0_dt), {"INPUT0": "same_output0", "INPUT1": "same_output0"},
                               {"OUTPUT0": "OUTPUT0"}),
                              (_nop(repo, out1_dt), {"INPUT0": "same_output1", "INPUT1": "same_output1"},
                               {"OUTPUT1": "OUTPUT1"})]
                name = f"{kind}_onnx{suffix}"
                for version in (1, 2, 3) if policy else (1,):  # empty version folders, as the policy asks
                    (repo / name / str(version)).mkdir(parents=True, exist_ok=True)
                (repo / name / "config.pbtxt").write_text(_ensemble_config(
                    name, batch=batch, dtypes=dtypes, policy=policy, labels=kind == "fan", steps=steps, size=size))
                if kind == "fan":
                    (repo / name / "output0_labels.txt").write_text("".join(f"label{i}\n" for i in range(size)))
