"""Triton's example models (docs/examples/model_repository, qa/) rebuilt as tiny ONNX graphs, each with the
config.pbtxt Triton ships for it, so tests can run what Triton's example clients and QA tests do.

    simple           INPUT0, INPUT1 INT32 [16] -> OUTPUT0 = sum, OUTPUT1 = difference; max_batch_size 8
    simple_string    the same on BYTES holding numbers as text (ORT casts string <-> int)
    simple_identity  BYTES [-1] -> the same BYTES
    identity_fp32    FP32 [-1] identity (raw binary requests: one variable dim, deducible)
    identity_fp16_2d FP16 [-1, -1] identity (raw binary: two variable dims, not deducible)
    identity_bytes_1 BYTES [1] identity (raw binary: one BYTES element)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_builders import write_config


def model_bytes(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def save_model(folder: Path, data: bytes, config: str, *, version: int = 1) -> Path:
    write_config(folder, config)
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    (folder / str(version) / "model.onnx").write_bytes(data)
    return folder


def add_sub_onnx(*, dtype: int = TensorProto.INT32, dims: tuple = ("N", 16)) -> bytes:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    io = [helper.make_tensor_value_info(n, dtype, list(dims)) for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    return model_bytes(helper.make_graph(nodes, "simple", io[:2], io[2:]))


def add_sub_string_onnx() -> bytes:
    """As add_sub_onnx on strings: cast to INT32, add/subtract, cast back to strings."""
    io = [helper.make_tensor_value_info(n, TensorProto.STRING, ["N", 16])
          for n in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")]
    nodes = [helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
             helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Sub", ["a", "b"], ["d"]),
             helper.make_node("Cast", ["s"], ["OUTPUT0"], to=TensorProto.STRING),
             helper.make_node("Cast", ["d"], ["OUTPUT1"], to=TensorProto.STRING)]
    return model_bytes(helper.make_graph(nodes, "simple_string", io[:2], io[2:]))


def identity_onnx(dtype: int, shape: list) -> bytes:
    x = helper.make_tensor_value_info("INPUT0", dtype, shape)
    y = helper.make_tensor_value_info("OUTPUT0", dtype, shape)
    return model_bytes(helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "identity", [x], [y]))


def flat_sum_onnx() -> bytes:
    """OUTPUT0 [N, 4] = INPUT0 [N, 4] + 1: served as [2, 2] with `reshape` in tests."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", 4])
    one = numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one")
    return model_bytes(helper.make_graph([helper.make_node("Add", ["INPUT0", "one"], ["OUTPUT0"])], "flat", [x], [y],
                                    [one]))


def optional_bias_onnx() -> bytes:
    """OUTPUT0 [4] = INPUT0 [4] + BIAS, BIAS an initializer (ones) a request may override."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [4])
    b = helper.make_tensor_value_info("BIAS", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [4])
    bias = numpy_helper.from_array(np.ones(4, dtype=np.float32), "BIAS")
    return model_bytes(helper.make_graph([helper.make_node("Add", ["INPUT0", "BIAS"], ["OUTPUT0"])], "bias", [x, b], [y],
                                    [bias]))


def _io(kind: str, names: tuple[str, ...], data_type: str, dims: str) -> str:
    return f"{kind} [\n" + ",\n".join(
        f'  {{ name: "{n}" data_type: {data_type} dims: [ {dims} ] }}' for n in names) + "\n]\n"


def simple_config(name: str, data_type: str) -> str:
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
            + _io("input", ("INPUT0", "INPUT1"), data_type, "16")
            + _io("output", ("OUTPUT0", "OUTPUT1"), data_type, "16"))


def _identity_config(name: str, data_type: str, dims: str, max_batch_size: int = 8) -> str:
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            + _io("input", ("INPUT0",), data_type, dims) + _io("output", ("OUTPUT0",), data_type, dims))


def build_triton_examples(repo: Path) -> Path:
    """Triton's example repository (the models above) under `repo`."""
    save_model(repo / "simple", add_sub_onnx(), simple_config("simple", "TYPE_INT32"))
    save_model(repo / "simple_string", add_sub_string_onnx(), simple_config("simple_string", "TYPE_STRING"))
    save_model(repo / "simple_identity", identity_onnx(TensorProto.STRING, ["N", "L"]),
          _identity_config("simple_identity", "TYPE_STRING", "-1"))
    save_model(repo / "identity_fp32", identity_onnx(TensorProto.FLOAT, ["N", "L"]),
          _identity_config("identity_fp32", "TYPE_FP32", "-1"))
    save_model(repo / "identity_fp16_2d", identity_onnx(TensorProto.FLOAT16, ["N", "H", "W"]),
          _identity_config("identity_fp16_2d", "TYPE_FP16", "-1, -1"))
    save_model(repo / "identity_bytes_1", identity_onnx(TensorProto.STRING, ["N", 1]),
          _identity_config("identity_bytes_1", "TYPE_STRING", "1"))
    return repo
