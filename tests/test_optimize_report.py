"""The optimize report's mechanics on the tiny zoo: a row per variant with every summary field, the
recommender student (built, and refused when over its HR@10 budget, saying why), the per-family Pareto
PNG; plus the pure pieces (Pareto front, ISA inference, format). Never timings: where the gate needs
speed, latency_samples is the seam and every variant is reported twice as fast as FP32."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from export import distill_recommender, optimize, pareto, report
from export.common import load_parent
from export.report_rows import SUMMARY_FIELDS, isa_used, variant_format

VARIANTS = ["fp32", "int8", "fp16", "student", "student-int8"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def all_twice_as_fast(real: Any) -> Any:
    def fake(paths: dict[str, Path], **kwargs: Any) -> dict[str, dict[int, list[float]]]:
        measured = real(paths, **kwargs)
        for name in measured:
            if name != "fp32":
                measured[name] = {b: [v / 2 for v in vs] for b, vs in measured["fp32"].items()}
        return measured

    return fake


def _optimize(repo: Path, out: Path, *families: str, extra: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    code = optimize.main(["--model-repository", str(repo), "--families", ",".join(families), "--output", str(out),
                          "--repeats", "3", *extra])
    assert code == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    return {f"{r['model']}/{r['variant']}": r for r in rows}


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_every_variant_gets_a_full_row_and_each_family_a_pareto_png(tiny_zoo: Path, tmp_path: Path) -> None:
    repo, out = tmp_path / "repo", tmp_path / "report"
    for model in ("recommender", "cnn"):
        shutil.copytree(tiny_zoo / model, repo / model)
    _optimize(repo, out, "recommender")
    rows = _optimize(repo, out, "cnn", extra=("--no-students",))  # a second run: the summary keeps both
    assert list(rows) == [f"cnn/{v}" for v in VARIANTS] + [f"recommender/{v}" for v in VARIANTS]
    for key, row in rows.items():
        assert set(SUMMARY_FIELDS) <= set(row), key
        assert isinstance(row["published"], bool) and row["why"], key
    built = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert set(built) == {f"cnn/{v}" for v in VARIANTS[:3]} | {f"recommender/{v}" for v in VARIANTS}
    for key, row in built.items():
        assert row["isa_used"] not in ("—", ""), key
        assert row["size_mb"] > 0 and row["metric"] and row["value"] is not None, key
        for b in (1, 32):
            ci = row["latency_ci"][str(b)]
            assert ci["low"] <= ci["median"] <= ci["high"] and row[f"latency_ms_b{b}"].count("[") == 1, key
            if not key.endswith("/fp32"):
                assert row[f"ratio_ci_b{b}"] and row["ratio_ci"][str(b)]["n"] == 3, key
    assert rows["recommender/fp32"]["delta"] == 0.0
    assert rows["cnn/student"]["why"] == "not published: not built" and "--no-students" in _notes(out, "cnn")
    assert rows["cnn/student-int8"]["format"] == "not built" and rows["cnn/student-int8"]["isa_used"] == "—"
    teacher_dim = load_parent(repo, "recommender").card["training"]["dim"]
    assert f"dim {teacher_dim // 2}" in rows["recommender/student"]["format"]
    assert rows["recommender/int8"]["format"].startswith("INT8")
    for family in ("recommender", "cnn"):
        _assert_png(out / f"{family}-pareto.png")
    table = (out / "summary.md").read_text()
    assert table.count("\n| recommender | recommender |") == len(VARIANTS)
    assert table.count("\n| cnn | cnn |") == len(VARIANTS)
    # `python -m export.report DIR` rebuilds the same summary from the per-model reports alone
    for made in [out / "summary.md", out / "summary.json", *out.glob("*-pareto.png")]:
        made.unlink()
    assert report.main([str(out)]) == 0
    assert (out / "summary.md").read_text() == table
    _assert_png(out / "cnn-pareto.png")


def test_report_cli_refuses_a_folder_without_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path)])
    assert exit_.value.code == 2 and "expected <model>.json reports" in capsys.readouterr().err


def _notes(out: Path, model: str) -> str:
    return json.dumps(json.loads((out / f"{model}.json").read_text())["rows"])


def test_a_recommender_student_over_budget_is_reported_not_published(
        tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, out = tmp_path / "repo", tmp_path / "report"
    shutil.copytree(tiny_zoo / "recommender", repo / "recommender")
    # An untrained student (random towers): far below the teacher's HR@10, however fast.
    untrained = dataclasses.replace(distill_recommender.SETTINGS["tiny"], epochs=0)
    monkeypatch.setitem(distill_recommender.SETTINGS, "tiny", untrained)
    monkeypatch.setattr(optimize, "latency_samples", all_twice_as_fast(optimize.latency_samples))
    rows = _optimize(repo, out, "recommender", extra=("--publish",))
    student = rows["recommender/student"]
    assert student["status"] == "ok" and student["delta"] < -0.01 and not student["within_budget"]
    assert not student["published"] and student["why"].startswith("not published: over its accuracy budget")
    assert "hr@10 drop <= 0.01" in student["why"]
    assert not (repo / "recommender-student").exists()
    # Same speed-up, within budget: the gate lets the int8 variant through, so the refusal above is the budget's.
    assert rows["recommender/int8"]["within_budget"] and rows["recommender/int8"]["published"]
    assert (repo / "recommender-int8").is_dir()
    _assert_png(out / "recommender-pareto.png")


def test_pareto_front_keeps_only_variants_nothing_beats() -> None:
    rows = [{"variant": n, "p50_ms_b32": ms, "value": acc} for n, ms, acc in
            [("fp32", 10.0, 0.99), ("int8", 4.0, 0.985), ("fp16", 9.0, 0.97), ("student", 3.0, 0.90),
             ("student-int8", 5.0, 0.98), ("broken", None, 0.5)]]
    assert [r["variant"] for r in pareto.front(rows)] == ["student", "int8", "fp32"]


@pytest.mark.parametrize(("flags", "kernels", "expected"), [
    ({"avx2": True, "avx512f": True, "avx512_vnni": True, "amx_int8": False}, {"QLinearConv": 3, "Gemm": 1},
     "AVX512-VNNI int8, AVX-512F fp32"),
    ({"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False}, {"MatMulInteger": 2},
     "AVX2 (no VNNI) int8"),
    ({"avx2": True, "avx512f": True, "avx512_vnni": True, "amx_int8": True}, {"DynamicQuantizeMatMul": 1},
     "AMX-INT8 int8"),
    ({"asimddp": True, "i8mm": False, "sve": False}, {"QGemm": 1, "Conv": 1}, "DOTPROD int8, SSE/NEON fp32"),
    ({"avx2": True}, {"TopK": 1, "Gather": 2}, "no Conv/MatMul kernels"),
])
def test_isa_used_follows_the_kernels_that_ran_and_the_cpu_flags(flags: dict[str, bool], kernels: dict[str, int],
                                                                 expected: str) -> None:
    assert isa_used(kernels, {"flags": flags}) == expected


def test_variant_format_says_what_each_pass_recorded() -> None:
    assert variant_format("fp32", {}, family="cnn").startswith("FP32")
    assert variant_format("int8", {"method": "static MinMax", "layout": "QDQ per-channel (measured)"},
                          family="cnn") == "INT8 static MinMax, QDQ per-channel (measured)"
    assert variant_format("student", {"distillation": {"student_dim": 16, "lr": 1e-3}},
                          family="recommender") == "FP32 ONNX, distilled recommender student (dim 16)"
    assert variant_format("student-int8", {"method": "dynamic", "layout": "dynamic"},
                          family="recommender") == "student, INT8 dynamic"


def test_listwise_loss_is_zero_on_the_teachers_ranking_and_grows_away_from_it() -> None:
    import torch

    teacher = torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 0.5, 2.0, 1.0]])
    events = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    same = distill_recommender.listwise_kd_loss(teacher.clone(), teacher, events, temperature=2.0, alpha=0.5)
    reversed_ = distill_recommender.listwise_kd_loss(-teacher, teacher, events, temperature=2.0, alpha=0.5)
    assert same[1].item() == pytest.approx(0.0, abs=1e-6) and reversed_[1].item() > 0.5
    assert reversed_[2].item() > same[2].item()  # the events' own likelihood drops too
    with pytest.raises(ValueError, match="temperature"):
        distill_recommender.listwise_kd_loss(teacher, teacher, events, temperature=0.0, alpha=0.5)
