"""INT8 / FP16 optimization passes on a copy of the tiny zoo: real quantizers, real ORT sessions,
the budget gate, the report files and a published variant served by the real server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import optimize
from export.common import check_budget, load_parent, ort_session, publish_if_within_budget
from export.heldout import evaluate, load_heldout
from export.quantize import CALIBRATION_METHODS, integer_op_counts
from tests.test_optimize_gate import int8_and_fp16_twice_as_fast


@pytest.fixture(scope="module")
def optimized(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the tiny zoo's cnn and recommender, optimized and published once for the module."""
    root = tmp_path_factory.mktemp("export_quant")
    repo = root / "repo"
    for name in ("cnn", "recommender"):
        shutil.copytree(tiny_zoo / name, repo / name)
    out = root / "report"
    # The publish gate also asks for a speed-up, which depends on this machine: the latencies are the
    # measured ones with INT8 reported twice as fast (tests/test_optimize_gate.py tests the gate itself).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimize, "latency_samples", int8_and_fp16_twice_as_fast(optimize.latency_samples))
        code = optimize.main(["--model-repository", str(repo), "--families", "cnn,recommender", "--output",
                              str(out), "--publish", "--repeats", "3", "--no-students"])
    assert code == 0
    return repo, out


def test_report_files_have_measured_numbers(optimized: tuple[Path, Path]) -> None:
    _, out = optimized
    for model in ("cnn", "recommender"):
        assert (out / f"{model}.png").stat().st_size > 1000
        assert "| int8 |" in (out / f"{model}.md").read_text()
        rows = {r["variant"]: r for r in json.loads((out / f"{model}.json").read_text())["rows"]}
        assert set(rows) == {"fp32", "int8", "fp16", "student", "student-int8"}
        for variant in ("fp32", "int8"):
            assert rows[variant]["p50_ms_b1"] > 0 and rows[variant]["p50_ms_b32"] > 0
            assert 0.0 <= rows[variant]["value"] <= 1.0
        assert rows["int8"]["size_mb"] < rows["fp32"]["size_mb"]
        assert rows["student"]["status"] == "not built"


def test_static_int8_follows_its_measured_layout_and_tried_every_calibration(optimized: tuple[Path, Path]) -> None:
    repo, _ = optimized
    model = repo / "cnn-int8" / "1" / "model.onnx"
    ops = integer_op_counts(model)
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    graph = onnx.load(str(model)).graph
    weights = {i.name: i for i in graph.initializer}
    # The layout is picked by measurement on this CPU (export/quant_grid.py), so the test reads which one the
    # card says was chosen and checks the graph has it: per-channel = some weight scale is a vector (one per
    # output channel), on a DequantizeLinear (QDQ) or a QLinearConv's w_scale (QOperator).
    scale_inputs = [n.input[1] for n in graph.node if n.op_type == "DequantizeLinear"]
    scale_inputs += [n.input[4] for n in graph.node if n.op_type == "QLinearConv"]
    scales = [weights[name] for name in scale_inputs if name in weights]
    card_layout = json.loads((repo / "cnn-int8" / "metrics.json").read_text())["layout"]
    chosen = [row for row in json.loads((repo / "cnn-int8" / "metrics.json").read_text())["layout_grid"] if row["chosen"]]
    assert len(chosen) == 1 and card_layout.startswith(chosen[0]["config"])
    per_channel = any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)
    assert per_channel == ("per-channel" in card_layout), card_layout
    card = json.loads((repo / "cnn-int8" / "metrics.json").read_text())
    assert {a["method"] for a in card["attempts"]} == set(CALIBRATION_METHODS)
    assert card["variant"] == "int8" and card["parent"] == "cnn" and card["budget"]["within_budget"] is True
    image = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    probs = ort_session(model).run(None, {"image": image})[0]
    assert probs.shape == (3, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-3)


def test_dynamic_int8_recommender_uses_integer_matmul(optimized: tuple[Path, Path]) -> None:
    repo, _ = optimized
    model = repo / "recommender-int8" / "1" / "model.onnx"
    assert integer_op_counts(model).get("MatMulInteger", 0) > 0
    assert (repo / "recommender-int8" / "seen_items.json").is_file()
    items, scores = ort_session(model).run(None, {"user_id": np.array([[0], [1]], dtype=np.int64)})
    assert items.dtype == np.int64 and items.shape == scores.shape and items.shape[0] == 2


def _broken_copy(src: Path, dst: Path) -> Path:
    """The cnn with its classifier weights shuffled across classes: a real, runnable, wrong model."""
    model = onnx.load(str(src))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(i for i in model.graph.initializer if i.name == gemm.input[1])
    array = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(np.roll(array, 3, axis=0).copy(), weight.name))
    onnx.save(model, str(dst))
    return dst


def test_budget_rejects_a_variant_over_budget_and_does_not_publish(tiny_zoo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_zoo / "cnn", repo / "cnn")
    parent = load_parent(repo, "cnn")
    heldout = load_heldout(parent)
    fp32 = evaluate(parent, parent.onnx_path, heldout)
    broken = _broken_copy(parent.onnx_path, tmp_path / "broken.onnx")
    metrics = evaluate(parent, broken, heldout)
    verdict = check_budget(model="cnn", variant_metrics=metrics, fp32_metrics=fp32)
    assert not verdict.ok and verdict.delta < -0.01
    assert publish_if_within_budget(repo_dir=repo, parent=parent, variant="int8", onnx_path=broken,
                                    metrics=metrics, fp32_metrics=fp32) is None
    assert not (repo / "cnn-int8").exists()
    # The same gate lets the unmodified model through (so the rejection above is the budget's doing).
    assert publish_if_within_budget(repo_dir=repo, parent=parent, variant="int8", onnx_path=parent.onnx_path,
                                    metrics=fp32, fp32_metrics=fp32) is not None


def test_published_variant_is_served(optimized: tuple[Path, Path], serve_repository) -> None:
    import tritonclient.http as httpclient

    repo, _ = optimized
    image = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    expected = ort_session(repo / "cnn-int8" / "1" / "model.onnx").run(None, {"image": image})[0]
    with serve_repository(repo) as url:
        client = httpclient.InferenceServerClient(url)
        assert client.is_model_ready("cnn-int8")
        request = httpclient.InferInput("image", list(image.shape), "FP32")
        request.set_data_from_numpy(image)
        result = client.infer("cnn-int8", [request], outputs=[httpclient.InferRequestedOutput("probabilities")])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-4, atol=1e-5)


def test_optimize_rejects_unknown_family(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        optimize.main(["--families", "cnn,vision"])
    assert "expected a comma-separated subset" in capsys.readouterr().err
