"""FP16 variants (a GPU serving variant) with ONNX Runtime's float16 conversion
(``onnxruntime.transformers.float16``, ORT's maintained fork of onnxconverter-common's converter: it
also rewrites Cast nodes' ``to`` attribute, which onnxconverter-common 1.16 leaves at FLOAT and so
produces an invalid MiniLM graph).

Inputs and outputs stay FP32 (``keep_io_types=True``) so clients and the config are unchanged.
This machine has no GPU: the report measures the FP16 graph on ONNX Runtime's CPU provider, where
most operators have no FP16 kernel, so ORT inserts casts / runs slow paths; if the CPU provider
cannot run the graph at all, the reason is recorded instead of numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from export.common import ort_session

# NOTE: operators whose FP16 range/precision commonly breaks results (exp/log overflow, top-k ties
# on integers, range ops) stay FP32, on top of the converter's own block list.
EXTRA_BLOCK = ["TopK", "Range", "Log", "Pow", "ReduceL2", "Erf"]


@dataclass
class Fp16Result:
    path: Path
    runs_on_cpu: bool
    cpu_note: str


def convert(src: Path, dst: Path) -> Path:
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + EXTRA_BLOCK
    converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _dedupe_casts(converted.graph)
    onnx.save(converted, str(dst))
    return dst


def _dedupe_casts(graph: onnx.GraphProto) -> None:
    """The converter inserts one Cast per blocked consumer of a tensor, all with the same node and
    output name (val_cast_to_fp32) when two blocked nodes read one tensor, which ORT rejects. The
    copies compute the same thing, so keep the first."""
    seen: set[bytes] = set()
    keep = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True) if node.op_type == "Cast" else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def to_fp16(src: Path, dst: Path) -> Fp16Result:
    """Convert and check whether ORT's CPU provider can run the FP16 graph (it is a GPU variant)."""
    convert(src, dst)
    try:
        ort_session(dst)
    except Exception as exc:  # the message is the result reported
        return Fp16Result(dst, False, f"ORT CPU cannot load it: {str(exc).splitlines()[0][:200]}")
    return Fp16Result(dst, True, "GPU variant; on CPU ORT runs it with FP16<->FP32 casts (not representative)")
