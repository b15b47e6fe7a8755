"""INT8 quantization with onnxruntime.quantization (pre-process, dynamic or static QDQ, FP32 fallback).

- Dynamic INT8 (``quantize_dynamic``) for the MatMul/Gather heavy models: ``transformer``,
  ``transformer-classifier`` and ``recommender``.
- Static INT8, QDQ format, per-channel weights (``quantize_static``) for ``cnn`` and ``speech``,
  calibrated on training examples through a ``CalibrationDataReader`` with MinMax, Entropy and
  Percentile; the best is kept (held-out metric first, then batch-32 latency).
- Speech graphs quantize their network only: the in-graph log-mel front end (split-DFT and mel MatMuls, Log)
  stays FP32 at every step (``fixed_fp32_nodes``, export/speech_split.py says why).
- When a result misses its accuracy budget, the most sensitive operators go back to FP32 in steps,
  as Intel Neural Compressor's basic strategy does (first/last quantizable nodes, LayerNormalization
  and Softmax, then more nodes at both ends), through ``nodes_to_exclude`` / ``op_types_to_quantize``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export import speech_split
from export.common import ParentModel, Verdict, check_budget, measure_latency
from export.heldout import HeldOut, evaluate

DYNAMIC_MODELS = ("transformer", "transformer-classifier", "recommender")
STATIC_MODELS = ("cnn", "speech")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
DYNAMIC_OPS = ["MatMul", "Gather", "Gemm", "Attention"]
# NOTE: the output Softmax stays FP32 always: quantized, the served probabilities come in 1/255 steps
# and no longer sum to 1 (the argmax survives, the scores clients read do not).
# NOTE: only the compute-heavy ops: QDQ around residual Adds/ReLUs added Quantize/Dequantize pairs that
# cost more than they saved (default cnn, batch 32: 0.72x FP32 with them, 0.36x without).
STATIC_OPS = ["Conv", "MatMul", "Gemm"]
# NOTE: speech's ReLUs each follow a Conv with nothing in between: quantized, the quantizer folds them into the
# Conv's U8 output range (ORT's removable-activation rule), removing a Dequantize/Quantize pair per ReLU.
# Default speech network at batch 32 (one interleaved run, load average 14): INT8/FP32 1.19 [0.91, 1.38] without
# them (8 pairs), 0.69 [0.61, 0.95] with, same accuracy; export.speech_bench, 3 runs: NumPy front end + INT8 network
# vs + FP32 network 1.09-1.12 without, 0.85-1.06 with (docs/BENCHMARKS.md, "Speech: front end split").
EXTRA_STATIC_OPS = {"speech": ["Relu"]}
ALWAYS_FP32 = ["Softmax"]
SENSITIVE_OPS = {"LayerNormalization", "Softmax"}
# Fallback steps: how many quantizable nodes to keep in FP32 at the (start, end) of the graph. Two at
# the start: a model's "first layer" is often a fixed front-end (speech: the DFT then mel MatMuls,
# whose power-spectrum input spans decades that 8 bits cannot hold).
FALLBACK_EDGE_NODES = ((0, 0), (2, 1), (3, 3))


@dataclass(frozen=True)
class QuantConfig:
    """How static INT8 is laid out: ORT format (QDQ pairs or QOperator QLinear* nodes), per-channel
    weights, 7-bit reduce_range weights, symmetric activations. export.quant_grid picks it by measurement."""

    fmt: str = "QDQ"
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False

    def label(self) -> str:
        return (f"{self.fmt}, {'per-channel' if self.per_channel else 'per-tensor'}"
                f"{', reduce_range' if self.reduce_range else ''}, "
                f"{'symmetric' if self.symmetric_activations else 'asymmetric'} activations")


# The layout before it was measured (kept for callers that do not run the grid).
DEFAULT_CONFIG = QuantConfig()


@dataclass
class QuantResult:
    """The chosen quantized model of one parent and how it was found."""

    path: Path
    method: str
    metrics: dict[str, float]
    verdict: Verdict
    kept_fp32: list[str]
    attempts: list[dict[str, Any]] = field(default_factory=list)


def preprocess(src: Path, dst: Path) -> Path:
    """ORT's quantization pre-process: symbolic shape inference, ONNX shape inference, graph optimization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # NOTE: value_info is only a shape hint; the merged classifier graph carries stale entries that
    # contradict inference (the quantizer then fails), so drop them and let inference recompute them.
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    src = dst.with_name(dst.stem + "-noinfo.onnx")
    onnx.save(model, str(src))
    src, dst = src.resolve(), dst.resolve()
    try:
        # NOTE: when symbolic inference gives up, ORT saves its partial model as
        # ./sym_shape_infer_temp.onnx + <uuid>.data in the *current directory*; keep that out of the
        # caller's working tree by running it from the output folder.
        with contextlib.chdir(dst.parent):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:  # symbolic inference does not know every exporter pattern
        logging.getLogger(__name__).warning("symbolic shape inference failed on %s (%s); retrying without", src, exc)
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


class FeedReader:
    """``CalibrationDataReader`` over a list of input dicts (ORT's reader protocol: get_next/rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._iter = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)


def _reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    # NOTE: registered as a virtual subclass so quantize_static's isinstance check accepts it.
    CalibrationDataReader.register(FeedReader)
    return FeedReader(feeds)


def fallback_plan(model_path: Path, *, op_types: list[str], step: int) -> tuple[list[str], list[str]]:
    """(op types to quantize, node names to keep in FP32) for fallback ``step`` (0 = quantize all)."""
    if step == 0:
        return op_types, []
    ops = [t for t in op_types if t not in SENSITIVE_OPS]
    graph = onnx.load(str(model_path)).graph
    weights = {i.name for i in graph.initializer}
    nodes = [n for n in graph.node if n.op_type in ops and n.name]
    head, tail = FALLBACK_EDGE_NODES[step]
    excluded = nodes[:head] + nodes[len(nodes) - tail:] if len(nodes) > head + tail else nodes
    # MatMuls of two activations (attention scores, attention x values) have both sides quantized at
    # run time with per-tensor ranges: the largest error source in MiniLM, so they fall back first.
    excluded += [n for n in nodes if n.op_type == "MatMul" and n.input[1] not in weights]
    return ops, list(dict.fromkeys(n.name for n in excluded))


def static_ops(model: str) -> list[str]:
    """Op types static INT8 quantizes in ``model`` (``STATIC_OPS`` plus ``EXTRA_STATIC_OPS``)."""
    return STATIC_OPS + EXTRA_STATIC_OPS.get(model, [])


def fixed_fp32_nodes(model_path: Path, *, family: str) -> list[str]:
    """Nodes that stay FP32 whatever the fallback step: a speech graph's front end, none elsewhere."""
    if family != "speech":
        return []
    return speech_split.frontend_nodes(onnx.load(str(model_path)).graph)


def _describe_kept(model_path: Path, excluded: list[str], op_types: list[str], all_ops: list[str]) -> list[str]:
    by_name = {n.name: n.op_type for n in onnx.load(str(model_path)).graph.node}
    kept = [f"{name} ({by_name.get(name, '?')})" for name in excluded]
    kept += [f"all {op} ops" for op in all_ops if op not in op_types and op in set(by_name.values())]
    return kept


def quantize_dynamic_model(pre: Path, out: Path, *, op_types: list[str], exclude: list[str]) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                     # NOTE: per-channel weights: per-tensor MiniLM weights measured cosine 0.961 to FP32
                     # (weight-only MatMuls), per-channel 0.993 on the same texts.
                     nodes_to_exclude=exclude, per_channel=True)
    return out


def quantize_static_model(pre: Path, out: Path, *, method: str, calibration: list[dict[str, np.ndarray]],
                          op_types: list[str], exclude: list[str], config: QuantConfig = DEFAULT_CONFIG) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}: expected one of {CALIBRATION_METHODS}")
    quant_format = getattr(QuantFormat, config.fmt)
    quantize_static(str(pre), str(out), _reader(calibration), quant_format=quant_format,
                    per_channel=config.per_channel, reduce_range=config.reduce_range,
                    # NOTE: U8 activations, S8 weights: ORT's fast x86 (VNNI) path; S8S8 measured 1.8x
                    # *slower* than FP32 on this CPU for the default cnn at batch 32, U8S8 0.72x.
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), op_types_to_quantize=op_types,
                    nodes_to_exclude=exclude,
                    # NOTE: symmetric activations waste half the U8 range on ReLU outputs; whether that
                    # costs accuracy or buys speed is measured (export.quant_grid), not assumed.
                    extra_options={"CalibTensorRangeSymmetric": config.symmetric_activations,
                                   "ActivationSymmetric": config.symmetric_activations})
    return out


def _attempt(parent: ParentModel, heldout: HeldOut, *, path: Path, method: str,
             fp32_metrics: dict[str, float], reference: list[np.ndarray] | None) -> dict[str, Any]:
    metrics = evaluate(parent, path, heldout, reference=reference)
    verdict = check_budget(model=parent.name, variant_metrics=metrics, fp32_metrics=fp32_metrics)
    return {"path": path, "method": method, "metrics": metrics, "verdict": verdict}


def _candidates(parent: ParentModel, heldout: HeldOut, *, pre: Path, work_dir: Path, step: int,
                fp32_metrics: dict[str, float], reference: list[np.ndarray] | None,
                config: QuantConfig) -> list[dict[str, Any]]:
    dynamic = parent.name in DYNAMIC_MODELS
    all_ops = DYNAMIC_OPS if dynamic else static_ops(parent.name)
    ops, exclude = fallback_plan(pre, op_types=all_ops, step=step)
    frontend = fixed_fp32_nodes(pre, family=parent.family)
    kept = _describe_kept(pre, exclude, ops, all_ops + ALWAYS_FP32)
    if frontend:
        kept.insert(0, f"log-mel front end ({len(frontend)} nodes)")
        exclude = list(dict.fromkeys([*frontend, *exclude]))
    found = []
    for method in (("dynamic",) if dynamic else CALIBRATION_METHODS):
        out = work_dir / f"{parent.name}-int8-{method.lower()}-s{step}.onnx"
        if dynamic:
            quantize_dynamic_model(pre, out, op_types=ops, exclude=exclude)
        else:
            quantize_static_model(pre, out, method=method, calibration=heldout.calibration, op_types=ops,
                                  exclude=exclude, config=config)
        row = _attempt(parent, heldout, path=out, method=method, fp32_metrics=fp32_metrics, reference=reference)
        found.append({**row, "kept_fp32": kept, "step": step})
    return found


def _pick(parent: ParentModel, rows: list[dict[str, Any]], heldout: HeldOut) -> dict[str, Any]:
    """Best by held-out metric; ties (equal metric) broken by batch-32 latency measured side by side."""
    best_value = max(r["verdict"].value for r in rows)
    tied = [r for r in rows if abs(r["verdict"].value - best_value) < 1e-9]
    if len(tied) == 1:
        return tied[0]
    paths = {str(i): r["path"] for i, r in enumerate(tied)}
    latency = measure_latency(paths, feeds={32: heldout.batch(32)}, repeats=5, warmup=1)
    return tied[min(range(len(tied)), key=lambda i: latency[str(i)][32])]


def quantize(parent: ParentModel, heldout: HeldOut, *, work_dir: Path, fp32_metrics: dict[str, float],
             reference: list[np.ndarray] | None = None, config: QuantConfig = DEFAULT_CONFIG) -> QuantResult:
    """INT8 variant of ``parent``: pre-process, quantize (dynamic or static x 3 calibrations, laid out as
    ``config``), evaluate, fall back sensitive nodes to FP32 while over budget. Returns the best attempt
    (maybe over budget)."""
    if parent.name not in DYNAMIC_MODELS + STATIC_MODELS:
        raise ValueError(f"no quantization recipe for {parent.name!r}")
    work_dir.mkdir(parents=True, exist_ok=True)
    pre = preprocess(parent.onnx_path, work_dir / f"{parent.name}-pre.onnx")
    return _search(parent, heldout, pre=pre, work_dir=work_dir, fp32_metrics=fp32_metrics, reference=reference,
                   config=config)


def _search(parent: ParentModel, heldout: HeldOut, *, pre: Path, work_dir: Path, fp32_metrics: dict[str, float],
            reference: list[np.ndarray] | None, config: QuantConfig) -> QuantResult:
    history: list[dict[str, Any]] = []
    for step in range(len(FALLBACK_EDGE_NODES)):
        rows = _candidates(parent, heldout, pre=pre, work_dir=work_dir, step=step, fp32_metrics=fp32_metrics,
                           reference=reference, config=config)
        history += rows
        within = [r for r in rows if r["verdict"].ok]
        if within:
            chosen = _pick(parent, within, heldout)
            break
    else:
        chosen = _pick(parent, history, heldout)
    attempts = [{"method": r["method"], "fallback_step": r["step"], "kept_fp32": r["kept_fp32"],
                 **r["verdict"].as_dict()} for r in history]
    return QuantResult(path=chosen["path"], method=chosen["method"], metrics=chosen["metrics"],
                       verdict=chosen["verdict"], kept_fp32=chosen["kept_fp32"], attempts=attempts)


def integer_op_counts(model_path: Path) -> dict[str, int]:
    """Counts of quantization ops in a graph (QDQ pairs, integer MatMul/Conv, dynamic quantize)."""
    wanted = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "GatherBlockQuantized"}
    counts: dict[str, int] = {}
    for node in onnx.load(str(model_path)).graph.node:
        if node.op_type in wanted:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
