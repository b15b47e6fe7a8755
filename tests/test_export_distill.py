"""Knowledge distillation: the loss against a hand computation, and a real (tiny) cnn student end to end."""

from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import pytest
import torch

from export import distill, distill_common
from export.distill_text import retrieval_overlap, teacher_layers


def _softmax(z: list[float]) -> list[float]:
    exps = [math.exp(v) for v in z]
    return [e / sum(exps) for e in exps]


def test_loss_matches_hand_computation():
    student, teacher, label, temperature, alpha = [2.0, 0.5, -1.0], [1.0, 3.0, 0.0], 1, 2.0, 0.6
    p = _softmax([v / temperature for v in teacher])
    q = _softmax([v / temperature for v in student])
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    hard = -math.log(_softmax(student)[label])
    total, soft, ce = distill_common.distillation_loss(torch.tensor([student]), torch.tensor([teacher]),
                                                torch.tensor([label]), temperature=temperature, alpha=alpha)
    assert soft.item() == pytest.approx(temperature**2 * kl, rel=1e-5)  # the T^2 scaling is applied
    assert ce.item() == pytest.approx(hard, rel=1e-5)
    assert total.item() == pytest.approx(alpha * temperature**2 * kl + (1 - alpha) * hard, rel=1e-5)


def test_loss_mixes_terms_and_rejects_bad_settings():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    only_soft, soft, _ = distill_common.distillation_loss(s, t, y, temperature=3.0, alpha=1.0)
    assert only_soft.item() == pytest.approx(soft.item())
    same, zero, _ = distill_common.distillation_loss(t, t, y, temperature=3.0, alpha=1.0)
    assert zero.item() == pytest.approx(0.0, abs=1e-6) and same.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distill_common.distillation_loss(s, t, y, temperature=0.0, alpha=0.5)


def test_log_probabilities_are_logits_up_to_a_shift():
    logits = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32) * 3
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    rebuilt = distill_common.teacher_logits_from_probabilities(probs)
    for temperature in (1.0, 4.0):
        np.testing.assert_allclose(torch.softmax(torch.from_numpy(rebuilt) / temperature, -1).numpy(),
                                   torch.softmax(torch.from_numpy(logits) / temperature, -1).numpy(), atol=1e-6)


def test_text_helpers():
    emb = np.random.default_rng(1).normal(size=(30, 8))
    assert retrieval_overlap(emb, emb) == 1.0
    assert retrieval_overlap(emb, np.random.default_rng(2).normal(size=(30, 8))) < 0.7
    assert teacher_layers({"input_spec": {"encoder_layers": "6 of 6"}}) == (6, 6)
    with pytest.raises(ValueError, match="K of N"):
        teacher_layers({"input_spec": {}})


def test_cnn_student_end_to_end(tiny_zoo, tmp_path, monkeypatch):
    import onnxruntime as ort

    repo = tmp_path / "repo"
    shutil.copytree(tiny_zoo / "cnn", repo / "cnn")
    calls: list[tuple[float, float, float]] = []
    real_loss = distill_common.distillation_loss

    def spy(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls.append((kwargs["temperature"], kwargs["alpha"], out[1].item()))
        return out

    monkeypatch.setattr(distill_common, "distillation_loss", spy)
    result = distill.build_student("cnn", repo_dir=repo, work_dir=tmp_path / "work", profile="tiny")
    assert result is not None and calls, "training must go through distillation_loss"
    # Every step used a softened (T > 1), non-zero soft term with real weight.
    assert all(t > 1.0 and a > 0.0 and soft > 0.0 for t, a, soft in calls)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    teacher = ort.InferenceSession(str(repo / "cnn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in teacher.get_inputs()]
    out = session.run(None, {"image": np.zeros((3, 1, 28, 28), np.float32)})[0]
    assert out.shape == (3, 10) and np.allclose(out.sum(1), 1.0, atol=1e-5)
    assert result.parameters < result.teacher_parameters
    student_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(result.onnx_path)).graph.initializer)
    teacher_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(repo / "cnn/1/model.onnx")).graph.initializer)
    assert student_params < teacher_params
    assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["test_examples"] > 0
    assert result.budget == "accuracy drop <= 0.01" and set(result.latency_ms) == {"teacher", "student"}
    assert result.details["parity"]["max_abs_diff"] <= 1e-4
    published = distill.publish_student(result, repo_dir=repo)
    assert (published is not None) == result.within_budget  # over budget: not published


def test_families_without_student_and_bad_profile(tmp_path):
    assert distill.build_student("no-such-family", repo_dir=tmp_path, work_dir=tmp_path, profile="tiny") is None
    with pytest.raises(ValueError, match="profile"):
        distill.build_student("cnn", repo_dir=tmp_path, work_dir=tmp_path, profile="huge")
