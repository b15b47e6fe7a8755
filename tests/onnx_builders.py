"""Tiny ONNX models built with onnx.helper, for server tests (no torch needed, built in milliseconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def scale_model(path: Path, *, factor: float = 2.0, width: int = 4, dtype: int = TensorProto.FLOAT) -> Path:
    """y = x * factor, x: [N, width] (N dynamic)."""
    x = helper.make_tensor_value_info("x", dtype, ["N", width])
    y = helper.make_tensor_value_info("y", dtype, ["N", width])
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    k = numpy_helper.from_array(np.array([factor], dtype=np_dtype), "k")
    return _save(helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "scale", [x], [y], [k]), path)


def two_io_model(path: Path) -> Path:
    """Two inputs, two outputs, dynamic batch and a dynamic non-batch dim: sum = a + b, idx = argmax(a)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "L"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", "L"])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", "L"])
    i = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])
    nodes = [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("ArgMax", ["a"], ["idx"], axis=1, keepdims=1),
    ]
    return _save(helper.make_graph(nodes, "two_io", [a, b], [s, i]), path)


def slow_model(path: Path, *, size: int = 384, repeats: int = 80) -> Path:
    """y[N,1]: per row, `repeats` chained size x size MatMuls on a matrix filled from x (a few hundred ms per row).

    The work depends on the input, so ONNX Runtime cannot constant-fold it away.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    ones = numpy_helper.from_array(np.full((1, size * size), 1.0 / size, dtype=np.float32), "ones")
    shape = numpy_helper.from_array(np.array([-1, size, size], dtype=np.int64), "shape")
    nodes = [helper.make_node("Mul", ["x", "ones"], ["flat"]), helper.make_node("Reshape", ["flat", "shape"], ["m0"])]
    for r in range(repeats):
        nodes.append(helper.make_node("MatMul", [f"m{r}", f"m{r}"], [f"m{r + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"m{repeats}"], ["red"], axes=[2], keepdims=0))
    nodes.append(helper.make_node("ReduceMean", ["red"], ["y"], axes=[1], keepdims=1))
    return _save(helper.make_graph(nodes, "slow", [x], [y], [ones, shape]), path)


def string_model(path: Path) -> Path:
    """BYTES in and out: y = Identity(x) on a string tensor [N, 1]."""
    x = helper.make_tensor_value_info("x", TensorProto.STRING, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["N", 1])
    return _save(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "strings", [x], [y]), path)


def write_config(model_dir: Path, text: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)


def not_model(path: Path) -> Path:
    """BOOL in and out: y = Not(x), x: [N, 2]."""
    x = helper.make_tensor_value_info("x", TensorProto.BOOL, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.BOOL, ["N", 2])
    return _save(helper.make_graph([helper.make_node("Not", ["x"], ["y"])], "not", [x], [y]), path)


def gather_model(path: Path, *, rows: int = 10) -> Path:
    """y = table[idx]: idx INT64 [N, 1] -> y FP32 [N, 1, 2]; an index >= rows makes ONNX Runtime fail."""
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 2])
    table = numpy_helper.from_array(np.arange(rows * 2, dtype=np.float32).reshape(rows, 2), "table")
    node = helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)
    return _save(helper.make_graph([node], "gather", [idx], [y], [table]), path)
