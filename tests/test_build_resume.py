"""`modelserve build` resumes a half-built zoo: a Ctrl-C after one family keeps it, and the next run
builds only the missing family (tiny profile, cnn + recommender: the two quickest families). The tests that
only read or re-derive published families start from copies of the session zoo's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models import build
from models.common import FamilyResult
from models.zoo import family_complete


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_build_keeps_finished_families_and_resumes_with_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "model_repository"
    argv = ["--profile", "tiny", "--families", "cnn,recommender", "--model-repository", str(repo)]
    real = build.build_family

    def ctrl_c_on_recommender(family: str, **kwargs: Any) -> FamilyResult:
        if family == "recommender":
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return real(family, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(build, "build_family", ctrl_c_on_recommender)
        assert build.main(argv) == 130
    first = capfd.readouterr().err
    assert "interrupted" in first and "kept cnn" in first
    assert family_complete(repo, "cnn", profile="tiny", seed=0)
    assert not family_complete(repo, "recommender", profile="tiny", seed=0)
    assert [f["family"] for f in json.loads((repo / build.SUMMARY_FILE).read_text())["families"]] == ["cnn"]
    kept = _mtimes(repo / "cnn")

    assert build.main(argv) == 0
    second = capfd.readouterr().err
    assert "kept (already built, profile tiny): cnn" in second
    assert "building recommender" in second and "building cnn" not in second
    assert _mtimes(repo / "cnn") == kept  # not one file of the kept family was rewritten
    assert family_complete(repo, "recommender", profile="tiny", seed=0)
    summary = json.loads((repo / build.SUMMARY_FILE).read_text())
    assert summary["kept"] == ["cnn"] and [f["family"] for f in summary["families"]] == ["cnn", "recommender"]
    log = (repo / build.LOG_FILE).read_text()
    assert "building recommender (tiny profile)" in log and log.count("building cnn (tiny profile)") == 1


def test_a_family_built_with_another_seed_is_not_complete(tiny_zoo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_zoo / "recommender", repo / "recommender")  # built by `build`, tiny profile, seed 0
    assert family_complete(repo, "recommender", profile="tiny", seed=0)
    assert not family_complete(repo, "recommender", profile="tiny", seed=1)
    assert not family_complete(repo, "recommender", profile="default", seed=0)
    (repo / "recommender" / "metrics.json").write_text("{not json")
    assert not family_complete(repo, "recommender", profile="tiny", seed=0)


def test_a_kept_speech_family_gains_its_missing_streaming_model_without_retraining(
        tiny_zoo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "model_repository"
    argv = ["--profile", "tiny", "--families", "speech", "--model-repository", str(repo)]
    for name in ("speech", "speech-stream"):  # the speech family as `build` publishes it (tiny profile, seed 0)
        shutil.copytree(tiny_zoo / name, repo / name)
    capfd.readouterr()
    streamed = (repo / "speech-stream" / "1" / "model.onnx").read_bytes()
    kept = _mtimes(repo / "speech")
    shutil.rmtree(repo / "speech-stream")  # a zoo built before the streaming model existed

    assert build.main(argv) == 0
    out = capfd.readouterr()
    assert "building speech" not in out.err and "derived from kept speech: speech-stream" in out.out + out.err
    assert _mtimes(repo / "speech") == kept
    assert (repo / "speech-stream" / "1" / "model.onnx").read_bytes() == streamed
