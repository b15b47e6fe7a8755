"""The sentence-encoder student's shape and budget mechanics: three-layer mapping, the learning-rate schedule
over a step or time budget (a fake clock, no timings), resuming a time-budgeted run, training-text
truncation and the checked options."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from export import distill
from export import distill_text_train as dt
from export.distill_text import text_overrides, training_tokenizer

transformers = pytest.importorskip("transformers")


def _tiny_encoder(layers: int = 6):
    from models.transformer_text import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    bert.set_attn_implementation("eager")
    return SentenceEncoder(bert.eval(), total_layers=layers)


def test_three_of_six_layers_with_a_narrow_ffn():
    plan = dt.StudentPlan(init_layers=dt.spread(6, keep=3), ffn=8)
    assert plan.init_layers == (0, 2, 5) and plan.hidden_targets(6) == (1, 4, 5)
    teacher = _tiny_encoder(6)
    student = dt.make_student(copy.deepcopy(teacher), plan)
    assert len(student.bert.encoder.layer) == 3 and student.bert.config.intermediate_size == 8
    assert all(layer.intermediate.dense.out_features == 8 for layer in student.bert.encoder.layer)
    assert torch.equal(student.bert.encoder.layer[1].attention.self.query.weight,
                       teacher.bert.encoder.layer[2].attention.self.query.weight)


def test_learning_rate_warms_up_then_anneals_to_zero():
    assert dt.lr_factor(0.0) == pytest.approx(0.04)
    assert dt.lr_factor(dt.WARMUP) == pytest.approx(1.0)
    after = [dt.lr_factor(p / 100) for p in range(7, 101)]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert dt.lr_factor(1.0) == pytest.approx(0.0, abs=1e-12) and dt.lr_factor(2.0) == dt.lr_factor(1.0)
    budget = dt.Budget(steps=100, minutes=2.0)
    assert budget.progress(step=10, seconds=60.0) == 0.5  # time runs out first
    assert budget.progress(step=80, seconds=60.0) == 0.8  # steps run out first
    assert dt.Budget(steps=100).progress(step=50, seconds=1e9) == 0.5


def _setup(tmp_path):
    from models.transformer_text import load_tokenizer, minilm_dir

    tokenizer = load_tokenizer(minilm_dir())
    texts = [f"Return the {w} of the given value number {i}." for i, w in enumerate(["sum", "mean", "size"] * 4)]
    batches = dt.length_batches(texts, batch_size=4)
    teacher = _tiny_encoder(6)
    cache = dt.TeacherCache(tmp_path / "cache", layers=(1, 4, 5))
    cache.fill(teacher, tokenizer=tokenizer, texts=texts, batches=batches)
    return tokenizer, texts, batches, teacher, cache


def test_time_budget_stops_training_and_survives_a_resume(tmp_path):
    tokenizer, texts, batches, teacher, cache = _setup(tmp_path)
    settings = {"epochs": 100, "minutes": 1.0, "lr": 1e-2, "weights": {"embedding": 1.0, "tokens": 1.0}}
    steps: list[int] = []

    def clock() -> float:  # each training step "takes" 10 s: a 1-minute budget is 6 steps
        return 10.0 * sum(steps)

    def run(student) -> dict[str, float]:
        return dt.train(student, cache=cache, tokenizer=tokenizer, texts=texts, batches=batches,
                        targets=(1, 4, 5), settings=settings, seed=0, checkpoint=tmp_path / "ckpt.pt",
                        progress=lambda n, postfix=None: steps.append(n), clock=clock)

    plan = dt.StudentPlan(dt.spread(6, keep=3), ffn=8)
    first = run(dt.make_student(copy.deepcopy(teacher), plan))
    assert steps == [1] * 6 and first["steps_trained"] == 6 and first["epochs_trained"] == 2.0
    assert first["final_embedding_loss"] > 0
    steps.clear()
    again = run(dt.make_student(copy.deepcopy(teacher), plan))
    assert steps == [6]  # the checkpoint carries the minute already spent: no step re-run, none added
    assert again == pytest.approx(first)


def test_training_texts_are_cut_at_max_tokens(tmp_path):
    from models.transformer_text import load_tokenizer, minilm_dir

    path = tmp_path / "tokenizer.json"
    load_tokenizer(minilm_dir()).save(str(path))  # the served copy: pads to the longest, cuts at 256
    long_text = " ".join(["configuration"] * 300)
    assert len(training_tokenizer(path, settings={"max_tokens": 16}).encode(long_text).ids) == 16
    assert len(training_tokenizer(path, settings={}).encode(long_text).ids) == 256


def test_text_options_are_checked_before_any_work():
    got = text_overrides({"epochs": None, "ffn": 512.0, "minutes": 60})  # None: the profile's
    assert got == {"ffn": 512, "minutes": 60.0} and isinstance(got["ffn"], int)
    with pytest.raises(ValueError, match=r"expected some of \['epochs', 'ffn', 'lr', 'max_texts', 'minutes', 'neighbours'\]"):
        text_overrides({"width": 3})
    with pytest.raises(ValueError, match="text student minutes -5: expected a positive number"):
        text_overrides({"minutes": -5})
    args = distill.parse_args(["--families", "transformer", "--text-ffn", "512", "--text-minutes", "60",
                               "--text-threads", "2", "--text-layers", "3"])
    assert (args.text_ffn, args.text_minutes, args.text_threads, args.text_layers) == (512, 60.0, 2, 3)
