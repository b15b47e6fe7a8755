"""The publish gate of `modelserve optimize`: a pure function of (budget verdict, latencies, device) tested
directly with injected latencies, then one real run on the tiny zoo's cnn (real quantizer, real ORT)
whose report must carry the gate's decision, and a real server in poll mode that picks the published
variant up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tritonclient.http as httpclient

from export import optimize
from export.common import Verdict, load_parent
from export.gate import MIN_SPEEDUP, Device, decide
from export.heldout import evaluate, load_heldout
from tests.conftest import run_server, wait_until

CPU = Device(("CPUExecutionProvider",))
GPU = Device(("CUDAExecutionProvider", "CPUExecutionProvider"))
WITHIN = Verdict(ok=True, value=0.99, delta=-0.001, budget="accuracy drop <= 0.01")
OVER = Verdict(ok=False, value=0.90, delta=-0.09, budget="accuracy drop <= 0.01")
PARENT = {1: 1.0, 32: 10.0}
FAST = {1: 0.5, 32: 4.0}


def test_within_budget_but_slower_than_parent_is_refused_with_the_latencies() -> None:
    slower = {1: 1.2, 32: 11.0}
    decision = decide(variant="int8", verdict=WITHIN, latency=slower, parent_latency=PARENT, timed_on="CPU",
                      device=CPU)
    assert not decision.publish
    assert "within budget" in decision.why and "not at least" in decision.why
    assert "1.2 vs 1 ms" in decision.why and "11 vs 10 ms" in decision.why
    assert decision.speedup[32] == pytest.approx(10.0 / 11.0)


def test_faster_at_one_batch_size_only_is_refused_naming_the_slow_one() -> None:
    mixed = {1: 1.1, 32: 4.0}
    decision = decide(variant="int8", verdict=WITHIN, latency=mixed, parent_latency=PARENT, timed_on="CPU",
                      device=CPU)
    assert not decision.publish and "at batch 1:" in decision.why


def test_within_budget_and_faster_is_published() -> None:
    decision = decide(variant="int8", verdict=WITHIN, latency=FAST, parent_latency=PARENT, timed_on="CPU",
                      device=CPU)
    assert decision.publish and decision.why.startswith("published:")
    assert decision.speedup == {1: 2.0, 32: 2.5} and decision.target_device == "CPU"


def test_barely_faster_is_within_noise_and_refused() -> None:
    barely = {b: v / (MIN_SPEEDUP - 0.01) for b, v in PARENT.items()}
    assert not decide(variant="int8", verdict=WITHIN, latency=barely, parent_latency=PARENT, timed_on="CPU",
                      device=CPU).publish


def test_over_budget_is_refused_however_fast() -> None:
    decision = decide(variant="int8", verdict=OVER, latency=FAST, parent_latency=PARENT, timed_on="CPU", device=CPU)
    assert not decision.publish and "over its accuracy budget" in decision.why


@pytest.mark.parametrize("timed_on", ["CPU", "GPU"])
def test_fp16_is_never_published_on_a_cpu_only_machine(timed_on: str) -> None:
    decision = decide(variant="fp16", verdict=WITHIN, latency=FAST, parent_latency=PARENT, timed_on=timed_on,
                      device=CPU)
    assert not decision.publish and "no GPU execution provider" in decision.why
    assert decision.target_device == "GPU"


def test_fp16_is_published_only_when_faster_on_the_gpu() -> None:
    on_gpu = decide(variant="fp16", verdict=WITHIN, latency=FAST, parent_latency=PARENT, timed_on="GPU", device=GPU)
    on_cpu = decide(variant="fp16", verdict=WITHIN, latency=FAST, parent_latency=PARENT, timed_on="CPU", device=GPU)
    assert on_gpu.publish and "on GPU" in on_gpu.why
    assert not on_cpu.publish and "timed on CPU" in on_cpu.why


def test_not_built_or_untimed_variants_are_refused() -> None:
    assert not decide(variant="student", verdict=None, latency=None, parent_latency=PARENT, timed_on="CPU",
                      device=CPU).publish
    untimed = decide(variant="int8", verdict=WITHIN, latency=None, parent_latency=PARENT, timed_on="CPU", device=CPU)
    assert not untimed.publish and "no latency measured" in untimed.why


def _verdict(saved: dict[str, Any]) -> Verdict:
    return Verdict(ok=saved["within_budget"], value=saved["value"], delta=saved["delta_vs_fp32"],
                   budget=saved["budget"])


def int8_and_fp16_twice_as_fast(real: Any) -> Any:
    """latency_samples as the seam: the real measurement, then INT8 and FP16 reported twice as fast as
    FP32 in every round (a machine where they win), so the gate's outcome does not depend on this machine's
    timings."""

    def fake(paths: dict[str, Path], **kwargs: Any) -> dict[str, dict[int, list[float]]]:
        measured = real(paths, **kwargs)
        for name in ("int8", "fp16"):
            if name in measured:
                measured[name] = {b: [v / 2 for v in vs] for b, vs in measured["fp32"].items()}
        return measured

    return fake


def test_optimize_publishes_what_the_gate_passes_and_a_polling_server_serves_it(
        tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_zoo / "cnn", repo / "cnn")
    out = tmp_path / "report"
    monkeypatch.setattr(optimize, "latency_samples", int8_and_fp16_twice_as_fast(optimize.latency_samples))
    with run_server(repo, extra_args=["--model-control-mode", "poll", "--repository-poll-secs", "0.2"]) as url:
        client = httpclient.InferenceServerClient(url)
        assert not any(m["name"] == "cnn-int8" for m in client.get_model_repository_index())
        code = optimize.main(["--model-repository", str(repo), "--families", "cnn", "--output", str(out),
                              "--publish", "--repeats", "3", "--no-students"])
        assert code == 0
        rows = {r["variant"]: r for r in json.loads((out / "cnn.json").read_text())["rows"]}
        assert all("published" in r and r["why"] for r in rows.values())
        for name, row in rows.items():
            if name == "fp32":
                continue
            again = decide(variant=name, verdict=_verdict(row["verdict"]) if "verdict" in row else None,
                           latency={1: row["p50_ms_b1"], 32: row["p50_ms_b32"]} if "p50_ms_b1" in row else None,
                           parent_latency={1: rows["fp32"]["p50_ms_b1"], 32: rows["fp32"]["p50_ms_b32"]},
                           timed_on=row["timed_on"], device=CPU)
            assert (row["published"], row["why"]) == (again.publish, again.why)
            assert (repo / f"cnn-{name}").is_dir() == row["published"]
        # the real int8 is within the tiny cnn's budget, so with the injected speed-up it goes out
        assert rows["int8"]["within_budget"] and rows["int8"]["published"]
        assert not rows["fp16"]["published"] and "no GPU execution provider" in rows["fp16"]["why"]
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith("published cnn-int8; a server in poll mode picks them up within")
        assert (out / "optimize.log").is_file()
        wait_until(lambda: client.is_model_ready("cnn-int8"), timeout=60, what="poll mode loading cnn-int8")
    card = json.loads((repo / "cnn-int8" / "metrics.json").read_text())
    assert card["gate"]["publish"] and card["gate"]["speedup_vs_fp32"]["32"] == pytest.approx(2.0)


def test_recommender_variants_use_the_model_cards_hr_at_10(tiny_zoo: Path) -> None:
    parent = load_parent(tiny_zoo, "recommender")
    metrics = evaluate(parent, parent.onnx_path, load_heldout(parent))
    # Same protocol (99 sampled negatives, the build's seed): the FP32 graph reproduces the card's figure.
    assert metrics["hr@10"] == pytest.approx(parent.card["metrics"]["hr@10"], abs=0.01)
    assert metrics["ndcg@10"] == pytest.approx(parent.card["metrics"]["ndcg@10"], abs=0.01)
    assert 0.0 <= metrics["hr@10_full"] <= metrics["hr@10"]
