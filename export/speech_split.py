"""Split a speech graph at its log-mel features: the front end (waveform -> log-mel) and the network.

The speech model computes its log-mel front end inside the graph (a 512-point DFT as MatMuls, mel MatMuls,
Log; models/speech_frontend.py). That part loses accuracy when quantized (8-bit waveform samples and a power
spectrum spanning decades) and, at the default width, costs about as much as the DS-CNN behind it; so INT8 quantizes the
network only (``frontend_nodes`` go to ``nodes_to_exclude``) and the front end stays FP32 in the same graph.
``network_graph`` cuts the front end off entirely: a graph with a ``logmel`` input, fed by the NumPy front
end of ``service/processing/logmel.py`` (edge bundles with ``--speech-frontend numpy``, the server).

The boundary is found in the ONNX graph itself (the first ``Log`` fed by the waveform), not by node
names, so it works on any published speech graph, its quantization pre-processed copy and its INT8 variants.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from service.processing.logmel import FEATURES, N_MELS

WAVEFORM = "waveform"


def _log_node(graph: onnx.GraphProto) -> onnx.NodeProto:
    logs = [n for n in graph.node if n.op_type == "Log"]
    if not logs:
        raise ValueError("not a speech graph with an in-graph log-mel front end: no Log node "
                         f"(op types: {sorted({n.op_type for n in graph.node})})")
    return logs[0]


def boundary(graph: onnx.GraphProto) -> str:
    """Name of the log-mel tensor ``[batch, frames, n_mels]``: the output of the front end's Log."""
    return str(_log_node(graph).output[0])


def frontend_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes the log-mel tensor is computed by (the front end), in graph order."""
    producer = {out: n for n in graph.node for out in n.output}
    wanted, stack = set[str](), [_log_node(graph)]
    while stack:
        node = stack.pop()
        if node.name in wanted:
            continue
        wanted.add(node.name)
        stack += [producer[i] for i in node.input if i in producer]
    if any(not n.name for n in graph.node if n.name in wanted):
        raise ValueError("front-end nodes without names cannot be excluded from quantization by name")
    return [n.name for n in graph.node if n.name in wanted]


def network_graph(src: Path, dst: Path) -> Path:
    """Write the graph after the front end: input ``logmel`` FP32 ``[batch, frames, N_MELS]``, the same
    outputs. Works on FP32 and INT8 (front end kept FP32) speech graphs alike."""
    model = onnx.load(str(src))
    cut = boundary(model.graph)
    outputs = [o.name for o in model.graph.output]
    tmp = dst.with_name(dst.stem + "-cut.onnx")
    # NOTE: extract_model re-runs shape inference; the symbolic dims come back as the exporter's names.
    onnx.utils.extract_model(str(src), str(tmp), [cut], outputs, check_model=False)
    network = onnx.load(str(tmp))
    tmp.unlink()
    for node in network.graph.node:
        node.input[:] = [FEATURES if i == cut else i for i in node.input]
    del network.graph.input[:]
    network.graph.input.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT,
                                                             ["batch", "frames", N_MELS]))
    onnx.checker.check_model(network)
    onnx.save(network, str(dst))
    return dst


def frontend_graph(src: Path, dst: Path) -> Path:
    """Write the front end alone: ``waveform`` -> the log-mel tensor (renamed ``logmel``)."""
    model = onnx.load(str(src))
    cut = boundary(model.graph)
    onnx.utils.extract_model(str(src), str(dst), [WAVEFORM], [cut], check_model=False)
    front = onnx.load(str(dst))
    for node in front.graph.node:
        node.output[:] = [FEATURES if o == cut else o for o in node.output]
    front.graph.output[0].name = FEATURES
    onnx.checker.check_model(front)
    onnx.save(front, str(dst))
    return dst
