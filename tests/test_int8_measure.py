"""Mechanics of the INT8 measurement (export.int8_measure, export.quant_grid's layouts): the ratio CI on
synthetic samples, ISA parsing from sample /proc/cpuinfo texts, ORT profiler parsing on a tiny real conv
model, and the gate's use of the CI. Never timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export import quantize
from export.common import Verdict
from export.gate import Device, decide
from export.int8_measure import (
    RatioCI,
    kernel_counts,
    kernels_text,
    parse_cpuinfo,
    parse_profile,
    ratio_ci,
    ratio_cis,
)
from export.quant_grid import GRID, pick

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse2 avx avx2 avx512f avx512bw avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""
WITHIN = Verdict(ok=True, value=0.99, delta=-0.001, budget="accuracy drop <= 0.01")
CPU = Device(("CPUExecutionProvider",))


def test_ci_of_a_clear_halving_lies_around_one_half() -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(10.0, 1.0, 60)
    ci = ratio_ci(base, base * 0.5 * rng.normal(1.0, 0.05, 60))
    assert ci.low < ci.median < ci.high
    assert 0.45 < ci.low and ci.high < 0.55 and ci.n == 60


def test_ci_of_noise_around_parity_straddles_one() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(10.0, 1.0, 40)
    ci = ratio_ci(base, base * rng.normal(1.0, 0.2, 40))
    assert ci.low < 1.0 < ci.high


def test_ci_is_paired_per_round_not_pooled() -> None:
    # Rounds differ 10x (machine load), the variant is always exactly 0.8x its own round: a paired
    # ratio sees 0.8 with no spread; pooled medians would not.
    base = [1.0, 10.0] * 10
    ci = ratio_ci(base, [0.8 * b for b in base])
    assert (ci.median, ci.low, ci.high) == pytest.approx((0.8, 0.8, 0.8))


def test_ci_needs_paired_samples() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        ratio_ci([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        ratio_ci([1.0], [1.0])


def test_ratio_cis_compares_every_variant_with_fp32_per_batch() -> None:
    samples = {"fp32": {1: [2.0, 2.0, 4.0], 32: [10.0, 20.0, 10.0]},
               "int8": {1: [1.0, 1.0, 2.0], 32: [30.0, 60.0, 30.0]}}
    cis = ratio_cis(samples)
    assert set(cis) == {"int8"}
    assert cis["int8"][1].median == pytest.approx(0.5) and cis["int8"][32].median == pytest.approx(3.0)


def test_isa_flags_from_an_x86_cpuinfo() -> None:
    info = parse_cpuinfo(X86_CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+" and info["arch"] == "x86"
    assert info["flags"] == {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": False,
                             "amx_int8": True}


def test_isa_flags_from_an_arm_cpuinfo() -> None:
    info = parse_cpuinfo(ARM_CPUINFO)
    assert info["arch"] == "arm" and info["model"] == "unknown"
    assert info["flags"] == {"asimddp": True, "i8mm": False, "sve": False}


def test_profile_parser_counts_node_kernels_only() -> None:
    events = [{"cat": "Session", "name": "model_run", "args": {}},
              {"cat": "Node", "name": "conv_fence_before", "args": {"op_name": "Conv"}},
              {"cat": "Node", "name": "conv_kernel_time", "args": {"op_name": "QLinearConv"}},
              {"cat": "Node", "name": "conv2_kernel_time", "args": {"op_name": "QLinearConv"}},
              {"cat": "Node", "name": "q_kernel_time", "args": {"op_name": "QuantizeLinear"}}]
    assert parse_profile(events) == {"QLinearConv": 2, "QuantizeLinear": 1}


def _conv_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [8, 1, 3, 3], rng.normal(size=72).astype(np.float32).tolist())
    bias = helper.make_tensor("b", TensorProto.FLOAT, [8], np.zeros(8, np.float32).tolist())
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 8, 8])],
                              initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_profiler_shows_integer_conv_for_int8_and_float_conv_for_fp32(tmp_path: Path, fmt: str) -> None:
    fp32 = _conv_model(tmp_path / "conv.onnx")
    feed = {"x": np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)}
    int8 = quantize.quantize_static_model(fp32, tmp_path / f"conv-{fmt}.onnx", method="MinMax", calibration=[feed],
                                          op_types=["Conv"], exclude=[],
                                          config=quantize.QuantConfig(fmt=fmt, per_channel=True))
    float_ops, int_ops = kernel_counts(fp32, feed), kernel_counts(int8, feed)
    assert {"Conv", "FusedConv"} & set(float_ops) and "QLinearConv" not in float_ops
    assert int_ops.get("QLinearConv") == 1 and not {"Conv", "FusedConv"} & set(int_ops)
    assert "QLinearConvx1" in kernels_text(int_ops)


def test_grid_spans_format_per_channel_reduce_range_and_symmetry() -> None:
    assert len(set(GRID)) == 16 and quantize.DEFAULT_CONFIG in GRID
    assert {c.fmt for c in GRID} == {"QDQ", "QOperator"}
    assert {(c.per_channel, c.reduce_range, c.symmetric_activations) for c in GRID if c.fmt == "QDQ"} == {
        (p, r, s) for p in (True, False) for r in (True, False) for s in (True, False)}


def test_symmetric_activations_reach_the_quantizer(tmp_path: Path) -> None:
    fp32 = _conv_model(tmp_path / "conv.onnx")
    feed = {"x": np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32)}
    zero_points = {}
    for symmetric in (False, True):
        out = quantize.quantize_static_model(fp32, tmp_path / f"s{symmetric}.onnx", method="MinMax",
                                             calibration=[feed], op_types=["Conv"], exclude=[],
                                             config=quantize.QuantConfig(symmetric_activations=symmetric))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
        zero_points[symmetric] = int(inits["x_zero_point"])
    # Inputs in [0, 1): asymmetric U8 puts zero at 0; symmetric centres it at 128.
    assert zero_points == {False: 0, True: 128}


def test_gate_refuses_when_the_ratio_ci_reaches_parity() -> None:
    fast = {1: 0.5, 32: 4.0}
    parent = {1: 1.0, 32: 10.0}
    unsure = {1: RatioCI(0.5, 0.4, 0.6, 30), 32: RatioCI(0.4, 0.3, 1.02, 30)}
    refused = decide(variant="int8", verdict=WITHIN, latency=fast, parent_latency=parent, timed_on="CPU",
                     device=CPU, ratio_ci=unsure)
    assert not refused.publish and "95% confidence" in refused.why and "b32 0.40 [0.30, 1.02]" in refused.why
    sure = {1: RatioCI(0.5, 0.4, 0.6, 30), 32: RatioCI(0.4, 0.3, 0.5, 30)}
    assert decide(variant="int8", verdict=WITHIN, latency=fast, parent_latency=parent, timed_on="CPU",
                  device=CPU, ratio_ci=sure).publish


def test_grid_keeps_the_default_layout_unless_clearly_beaten() -> None:
    default = {1: RatioCI(0.80, 0.70, 0.90, 15), 32: RatioCI(0.45, 0.40, 0.50, 15)}
    within_noise = {1: RatioCI(0.76, 0.70, 0.85, 15), 32: RatioCI(0.42, 0.38, 0.47, 15)}
    assert pick({"0": default, "8": within_noise}, default="0") == "0"
    clearly = {1: RatioCI(0.60, 0.55, 0.70, 15), 32: RatioCI(0.30, 0.28, 0.33, 15)}
    assert pick({"0": default, "8": within_noise, "9": clearly}, default="0") == "9"
    # The default over budget (not timed): the fastest timed layout wins.
    assert pick({"8": within_noise, "9": clearly}, default="0") == "9"
