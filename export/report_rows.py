"""The per-variant fields of the optimize report that are not the gate's: format/layout, the ISA features
its kernels use on this CPU, and p50 latency with a bootstrap CI.

``SUMMARY_FIELDS`` is the one list of the summary row's fields (the keys ``export.optimize`` sets on each
row, each with its meaning); ``export.report`` renders it as the cross-family table, the Pareto plots
(``export.pareto``) read the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from export.gate import GATE_BATCHES
from export.int8_measure import INTEGER_KERNELS, RatioCI, median_ci

FLOAT_KERNELS = ("Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul")

SUMMARY_FIELDS: dict[str, str] = {
    "family": "model family",
    "model": "parent model in the repository",
    "variant": "fp32 (the parent), int8, fp16, student, student-int8",
    "format": "number format and graph layout of the variant",
    "isa_used": "ISA features its Conv/MatMul kernels use on this CPU (ORT profiler kernels x CPU flags, "
                "MLAS dispatch order)",
    **{f"latency_ms_b{b}": f"p50 ms at batch {b} [95% bootstrap CI of the median]" for b in GATE_BATCHES},
    **{f"ratio_ci_b{b}": f"latency / FP32 latency at batch {b}, median of paired rounds [95% CI]"
       for b in GATE_BATCHES},
    "metric": "held-out accuracy metric of the family's budget",
    "value": "its value",
    "delta": "value - the FP32 parent's value (same data, same protocol)",
    "size_mb": "ONNX file size (MB)",
    "published": "whether the publish gate let it through",
    "why": "the gate's reason",
}


def variant_format(variant: str, card: Mapping[str, Any], *, family: str) -> str:
    """Number format and layout: from what the pass recorded in the variant's card."""
    if variant == "fp32":
        return "FP32 ONNX (the parent)"
    if variant == "fp16":
        return "FP16 weights and compute, FP32 inputs/outputs"
    if variant.endswith("int8"):
        prefix = "student, " if variant.startswith("student") else ""
        method, layout = str(card.get("method", "")), str(card.get("layout", "layout not recorded"))
        return f"{prefix}INT8 {method}" + ("" if layout == method else f", {layout}")
    if variant == "student":
        shape = {k: v for k, v in (card.get("distillation") or {}).items() if k.startswith("student_")}
        size = ", ".join(f"{k.removeprefix('student_')} {v}" for k, v in shape.items())
        return f"FP32 ONNX, distilled {family} student" + (f" ({size})" if size else "")
    return "not recorded"


def isa_used(kernels: Mapping[str, int] | None, isa: Mapping[str, Any]) -> str:
    """The ISA features this variant's compute kernels use on this CPU.

    NOTE: inferred, not traced: ORT's profiler says which op kernels ran (export.int8_measure.kernel_counts),
    and MLAS picks the widest implementation the CPU offers at start-up (onnxruntime/core/mlas/lib/
    platform.cpp): integer GEMM AMX > AVX512-VNNI > AVX-VNNI > AVX-512 core (vpmaddubsw) > AVX2, float
    GEMM AVX-512F > AVX2/FMA3; on Arm i8mm > dot product for integers, NEON for floats.
    """
    if kernels is None:
        return "—"
    flags = {f for f, on in isa.get("flags", {}).items() if on}
    used = []
    if any(k in INTEGER_KERNELS for k in kernels):
        used.append(_first(flags, (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX512-VNNI"),
                                   ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX-512 (no VNNI)"),
                                   ("avx2", "AVX2 (no VNNI)"), ("i8mm", "I8MM"), ("asimddp", "DOTPROD")),
                           default="SSE/NEON (no integer dot product)") + " int8")
    if any(k in FLOAT_KERNELS for k in kernels):
        used.append(_first(flags, (("avx512f", "AVX-512F"), ("avx2", "AVX2/FMA3"), ("sve", "SVE")),
                           default="SSE/NEON") + " fp32")
    return ", ".join(used) or "no Conv/MatMul kernels"


def _first(flags: set[str], order: Sequence[tuple[str, str]], *, default: str) -> str:
    return next((label for flag, label in order if flag in flags), default)


def latency_cis(samples: Mapping[str, Mapping[int, Sequence[float]]]) -> dict[str, dict[int, RatioCI]]:
    """Per variant and batch size: the p50 ms and the bootstrap CI of that median (at least 2 rounds)."""
    return {name: {b: median_ci(v) for b, v in per.items() if len(v) >= 2} for name, per in samples.items()}


def latency_text(ci: RatioCI | None) -> str | None:
    return None if ci is None else f"{ci.median:.3g} [{ci.low:.3g}, {ci.high:.3g}]"


def summary_fields(*, family: str, model: str, variant: str, card: Mapping[str, Any],
                   kernels: Mapping[str, int] | None, isa: Mapping[str, Any],
                   latency: Mapping[int, RatioCI] | None, built: bool = True) -> dict[str, Any]:
    """The row keys of ``SUMMARY_FIELDS`` that the gate's row (export.optimize._row) does not carry."""
    form = variant_format(variant, card, family=family) if built else "not built"
    out: dict[str, Any] = {"family": family, "model": model, "format": form, "isa_used": isa_used(kernels, isa)}
    for b in GATE_BATCHES:
        ci = (latency or {}).get(b)
        out[f"latency_ms_b{b}"] = latency_text(ci)
        if ci is not None:
            out.setdefault("latency_ci", {})[str(b)] = ci.as_dict()
    return out
