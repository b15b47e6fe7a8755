"""The GPU bench's model: the bench CNN's architecture (loadtests/benchmodel.py) written with onnx.helper,
so the one-shot GPU script needs no torch on the GPU machine. Random weights: the bench measures serving,
and conv cost does not depend on the weight values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from loadtests.benchmodel import INPUT_DIMS, INPUT_NAME, OUTPUT_NAME

CLASSES = 10


def build_cnn(path: Path, *, width: int, seed: int = 0) -> Path:
    """conv-conv-pool-conv-pool-conv-GAP-linear on [N,1,28,28] -> [N,10] (the N axis dynamic)."""
    rng = np.random.default_rng(seed)
    weights: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def param(name: str, shape: tuple[int, ...], fan_in: int) -> str:
        weights.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name))
        return name

    def conv(src: str, dst: str, cin: int, cout: int) -> None:
        w, b = param(f"{dst}_w", (cout, cin, 3, 3), cin * 9), param(f"{dst}_b", (cout,), cin * 9)
        nodes.append(helper.make_node("Conv", [src, w, b], [f"{dst}_c"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"{dst}_c"], [dst]))

    def pool(src: str, dst: str) -> None:
        nodes.append(helper.make_node("MaxPool", [src], [dst], kernel_shape=[2, 2], strides=[2, 2]))

    conv(INPUT_NAME, "c1", INPUT_DIMS[0], width)
    conv("c1", "c2", width, width)
    pool("c2", "p2")
    conv("p2", "c3", width, 2 * width)
    pool("c3", "p3")
    conv("p3", "c4", 2 * width, 2 * width)
    nodes.append(helper.make_node("GlobalAveragePool", ["c4"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    w, b = param("fc_w", (2 * width, CLASSES), 2 * width), param("fc_b", (CLASSES,), 2 * width)
    nodes.append(helper.make_node("Gemm", ["flat", w, b], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes, "bench_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *INPUT_DIMS])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", CLASSES])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
