"""The sentence-encoder student's budget is defined once (export.common.STUDENT_BUDGETS) and applied alike by
the student's own verdict (export.distill_text.budget_verdict) and by the publish gate of `modelserve optimize`
(export.optimize's report row: budget verdict, then export.gate.decide); the teacher's INT8/FP16 variants
keep their own stricter budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from export import optimize
from export.common import BUDGETS, STUDENT_BUDGETS, ParentModel, budget_for, load_parent
from export.distill_text import budget_verdict
from export.gate import Device
from export.heldout import evaluate, fp32_outputs, load_heldout

CPU = Device(("CPUExecutionProvider",))
FP32 = {"cosine_to_fp32": 1.0, "top10_retrieval_overlap": 1.0}


def gate_row(tmp_path: Path, *, variant: str, cosine: float, overlap: float, speedup: float) -> dict:
    """The optimize report's row for ``variant`` of the transformer, timed at ``speedup`` x FP32 at batch 1 and 32."""
    onnx = tmp_path / f"{variant}.onnx"
    onnx.write_bytes(b"\0" * 1024)
    parent = ParentModel(name="transformer", family="transformer", model_dir=tmp_path, onnx_path=onnx,
                         card={}, config_text="")
    p50 = {"fp32": {1: 3.0 * speedup, 32: 30.0 * speedup}, variant: {1: 3.0, 32: 30.0}}
    timing = optimize.Timing(p50={"CPU": p50}, ci={})
    metrics = {"cosine_to_fp32": cosine, "top10_retrieval_overlap": overlap}
    row, decision = optimize._row(parent, optimize.Variant(variant, onnx, metrics), fp32=FP32, timing=timing,
                                  device=CPU, kernels=None)
    return {**row, "publish": decision.publish}


def test_one_definition_of_the_students_targets():
    student = budget_for("transformer", "student")
    assert student is STUDENT_BUDGETS["transformer"] is budget_for("transformer", "student-int8")
    assert student.describe() == ("mean cosine to teacher >= 0.95, top-10 overlap >= 0.85, "
                                  "speedup at batch 32 >= 3")
    # The teacher's own variants keep their stricter budget; families without a student entry share theirs.
    assert budget_for("transformer", "int8") is budget_for("transformer", "fp16") is BUDGETS["transformer"]
    assert BUDGETS["transformer"].min_value == 0.99
    assert budget_for("recommender", "student") is BUDGETS["recommender"]


def test_a_student_within_its_targets_passes_both_paths(tmp_path):
    assert budget_verdict(cosine=0.96, overlap=0.86, speedup=3.1) == (True, "within budget")
    row = gate_row(tmp_path, variant="student", cosine=0.96, overlap=0.86, speedup=3.1)
    assert row["within_budget"] is True and row["publish"] is True, row["why"]
    assert row["budget"] == STUDENT_BUDGETS["transformer"].describe()


@pytest.mark.parametrize(("cosine", "overlap", "speedup", "reason"), [
    (0.94, 0.86, 3.1, "mean cosine to teacher 0.940 < 0.95"),
    (0.96, 0.84, 3.1, "top-10 overlap 0.840 < 0.85"),
    (0.96, 0.86, 2.9, "speedup at batch 32 2.900 < 3"),
])
def test_a_student_missing_a_target_fails_both_paths_naming_it(tmp_path, cosine, overlap, speedup, reason):
    ok, why = budget_verdict(cosine=cosine, overlap=overlap, speedup=speedup)
    assert not ok and why == f"missed: {reason}"
    row = gate_row(tmp_path, variant="student", cosine=cosine, overlap=overlap, speedup=speedup)
    assert row["within_budget"] is False and row["publish"] is False
    assert row["why"].startswith("not published: over its accuracy budget") and reason in row["why"]
    assert row["verdict"]["missed"] == [reason]


def test_the_teachers_int8_variant_keeps_its_stricter_budget(tmp_path):
    row = gate_row(tmp_path, variant="int8", cosine=0.96, overlap=0.86, speedup=3.1)
    assert row["within_budget"] is False and row["publish"] is False
    assert "cosine_to_fp32 0.960 < 0.99" in row["why"]


def test_the_optimize_evaluation_measures_every_target_of_the_students_budget(tiny_zoo: Path):
    # The gate can only judge a student by targets its held-out evaluation measures (export.heldout.evaluate).
    parent = load_parent(tiny_zoo, "transformer")
    heldout = load_heldout(parent)
    ref = fp32_outputs(parent, heldout)
    metrics = evaluate(parent, parent.onnx_path, heldout, reference=ref)
    measured = [f.metric for f in STUDENT_BUDGETS["transformer"].also if not f.metric.startswith("speedup_")]
    assert measured == ["top10_retrieval_overlap"]
    assert metrics["top10_retrieval_overlap"] == pytest.approx(1.0) and metrics["cosine_to_fp32"] == pytest.approx(1.0)
    # Against other embeddings (the FP32 ones reversed across texts) the neighbours change.
    shuffled = evaluate(parent, parent.onnx_path, heldout, reference=[ref[0][::-1].copy()])
    assert shuffled["top10_retrieval_overlap"] < 0.5
