"""The sentence-encoder student's mechanics on a tiny BERT: offline text, layer mapping, FFN pruning, losses,
teacher cache + resumable training, and the budget decision. No timings."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from export import distill, text_corpus
from export import distill_text_train as dt
from export.distill_common import StudentResult
from export.distill_text import budget_verdict, text_overrides

transformers = pytest.importorskip("transformers")

MODULE_SOURCE = '''"""Tools for reading and writing configuration files.

More detail here."""

class Reader:
    """Read a configuration file into a dictionary of sections."""

    def close(self):
        """Close the underlying file handle."""

def f():
    """Too short."""
'''


def _tiny_encoder(layers: int = 4, *, seed: int = 0):
    from models.transformer_text import SentenceEncoder

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    bert.set_attn_implementation("eager")
    return SentenceEncoder(bert.eval(), total_layers=layers)


def test_docstrings_and_prose_become_texts():
    assert list(text_corpus.docstring_texts(MODULE_SOURCE)) == [
        "Tools for reading and writing configuration files.",
        "Reader: Read a configuration file into a dictionary of sections.",
        "close: Close the underlying file handle."]
    assert list(text_corpus.docstring_texts("def broken(:\n")) == []
    doc = ("# Title\n\nThis package parses dates in many formats quickly.\n\n"
           "    code_block = 1\n    more_code()\n\n| a | b |\n|---|---|\n\n>>> import x\n\nshort.\n")
    assert list(text_corpus.prose_paragraphs(doc)) == ["This package parses dates in many formats quickly."]


def test_package_texts_read_files_offline_and_drop_held_out(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(MODULE_SOURCE)
    (tmp_path / "pkg" / "README.md").write_text("Use this library to convert units between systems.\n")
    (tmp_path / "pkg-1.0.dist-info").mkdir()
    (tmp_path / "pkg-1.0.dist-info" / "METADATA").write_text(
        "Name: pkg\nVersion: 1.0\n\nA long description that reads like an English sentence.\n")
    texts = text_corpus.package_texts([tmp_path])
    assert "Reader: Read a configuration file into a dictionary of sections." in texts
    assert "Use this library to convert units between systems." in texts
    assert "A long description that reads like an English sentence." in texts
    assert "Name: pkg" not in " ".join(texts)
    # held out: the same summary under another name (a vendored copy) goes too
    kept = text_corpus.without(texts, exclude={"close_file: Close the underlying file handle."})
    assert "close: Close the underlying file handle." in texts and "close: Close the underlying file handle." not in kept
    assert len(kept) == len(texts) - 1


def test_installed_packages_yield_english_text():
    import annotated_types

    texts = text_corpus.package_texts([Path(annotated_types.__file__).parent])
    assert len(texts) >= 5 and all(4 <= len(t.split()) <= 64 for t in texts)


def test_layer_mapping_copies_the_chosen_teacher_layers():
    teacher = _tiny_encoder(4)
    original = copy.deepcopy(teacher)
    plan = dt.StudentPlan(init_layers=dt.spread(4, keep=2))
    assert plan.init_layers == (0, 3) and plan.hidden_targets(4) == (2, 3)
    assert dt.spread(6, keep=2) == (0, 5) and dt.StudentPlan(init_layers=(0, 1)).hidden_targets(6) == (0, 5)
    student = dt.make_student(teacher, plan)
    assert student.layers == 2 and student.bert.config.num_hidden_layers == 2
    for mine, theirs in zip(student.bert.encoder.layer, [original.bert.encoder.layer[i] for i in (0, 3)]):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="increasing layer indices"):
        dt.make_student(_tiny_encoder(4), dt.StudentPlan(init_layers=(3, 1)))


def test_narrow_ffn_keeps_the_strongest_neurons():
    layer = _tiny_encoder(1).bert.encoder.layer[0]
    with torch.no_grad():
        layer.intermediate.dense.weight.mul_(0.01)
        layer.intermediate.dense.weight[[3, 17, 30]] *= 1000.0
    up, down = layer.intermediate.dense.weight.clone(), layer.output.dense.weight.clone()
    keep = dt.narrow_ffn(layer, width=3)
    assert keep.tolist() == [3, 17, 30]
    assert torch.equal(layer.intermediate.dense.weight, up[keep]) and torch.equal(layer.output.dense.weight, down[:, keep])
    full = _tiny_encoder(1)
    ids = torch.randint(1000, 2000, (2, 5))
    mask = torch.ones_like(ids)
    before = full(ids, mask)
    dt.narrow_ffn(full.bert.encoder.layer[0], width=32)  # every neuron kept: the same function
    torch.testing.assert_close(full(ids, mask), before)
    with pytest.raises(ValueError, match="ffn width"):
        dt.narrow_ffn(full.bert.encoder.layer[0], width=33)


def test_token_and_attention_losses():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 8, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert dt.token_cosine_loss(hidden, hidden, mask).item() == pytest.approx(0.0, abs=1e-6)
    moved = hidden.clone()
    moved[0, 3] = -moved[0, 3]  # a padded position: ignored
    assert dt.token_cosine_loss(moved, hidden, mask).item() == pytest.approx(0.0, abs=1e-6)
    moved[0, 0] = -moved[0, 0]  # one of 5 real tokens opposite: loss 2 / 5
    assert dt.token_cosine_loss(moved, hidden, mask).item() == pytest.approx(2 / 5, rel=1e-5)

    teacher = torch.tensor([0.7, 0.2, 0.1, 0.0])
    student = torch.tensor([0.4, 0.4, 0.2, 0.0])
    t, s = teacher.expand(1, 1, 4, 4).clone(), student.expand(1, 1, 4, 4).clone()
    one = torch.tensor([[1, 1, 1, 0]])
    hand = sum(p * (math.log(p) - math.log(q)) for p, q in zip([0.7, 0.2, 0.1], [0.4, 0.4, 0.2]))
    assert dt.attention_kl(s, t, one).item() == pytest.approx(hand, rel=1e-5)
    assert dt.attention_kl(t, t, one).item() == pytest.approx(0.0, abs=1e-6)


def test_distil_losses_weigh_every_term_and_train_the_student():
    teacher, student = _tiny_encoder(4, seed=0), dt.make_student(_tiny_encoder(4, seed=1), dt.StudentPlan((0, 3)))
    ids = torch.randint(1000, 2000, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    with torch.no_grad():
        target = dt.internals(teacher, ids, mask)
    target["hidden"] = {i: target["hidden"][i] for i in (2, 3)}
    got = dt.internals(student, ids, mask)
    assert len(got["hidden"]) == 2 and got["attention"].shape == (3, 2, 6, 6)
    weights = {"embedding": 2.0, "tokens": 1.0, "hidden": 0.3, "attention": 0.1}
    terms = dt.distil_losses(got, target, mask, targets=(2, 3), weights=weights)
    assert set(terms) == {"embedding", "tokens", "hidden", "attention", "total"}
    assert all(terms[name].item() > 0 for name in weights)
    expected = sum(weights[name] * terms[name].item() for name in weights)
    assert terms["total"].item() == pytest.approx(expected, rel=1e-5)
    terms["total"].backward()
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_neighbour_term_ranks_texts_among_a_bank_as_the_teacher_does():
    gen = torch.Generator().manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    teacher, bank = unit(torch.randn(3, 8, generator=gen)), unit(torch.randn(5, 8, generator=gen))
    assert dt.neighbour_kl(teacher, teacher, bank).item() == pytest.approx(0.0, abs=1e-6)
    nearer = unit(teacher + 0.1 * torch.randn(3, 8, generator=gen))
    farther = unit(teacher + 1.0 * torch.randn(3, 8, generator=gen))
    assert 0 < dt.neighbour_kl(nearer, teacher, bank).item() < dt.neighbour_kl(farther, teacher, bank).item()
    # by hand for one text: KL(softmax(t.B/T) || softmax(s.B/T))
    p = torch.softmax(teacher[:1] @ bank.T / 0.05, -1)
    q = torch.softmax(farther[:1] @ bank.T / 0.05, -1)
    hand = (p * (p.log() - q.log())).sum().item()
    assert dt.neighbour_kl(farther[:1], teacher[:1], bank).item() == pytest.approx(hand, rel=1e-4)

    kept = dt.NeighbourBank(size=4)
    kept.add(bank[:3])
    kept.add(bank[3:])  # first in, first out
    assert kept.rows is not None and torch.equal(kept.rows, bank[1:])


def test_neighbour_weight_adds_the_term_once_a_bank_exists(tmp_path):
    teacher, student = _tiny_encoder(4, seed=0), dt.make_student(_tiny_encoder(4, seed=1), dt.StudentPlan((0, 3)))
    ids, mask = torch.randint(1000, 2000, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        target = dt.internals(teacher, ids, mask)
    target["hidden"] = {i: target["hidden"][i] for i in (2, 3)}
    weights = {"embedding": 1.0, "neighbours": 0.5}
    got = dt.internals(student, ids, mask)
    assert "neighbours" not in dt.distil_losses(got, target, mask, targets=(2, 3), weights=weights)
    terms = dt.distil_losses(got, target, mask, targets=(2, 3), weights=weights, bank=target["embedding"])
    assert terms["neighbours"].item() > 0
    assert terms["total"].item() == pytest.approx(terms["embedding"].item() + 0.5 * terms["neighbours"].item(),
                                                  rel=1e-5)
    assert text_overrides({"neighbours": 0.5}) == {"neighbours": 0.5}
    with pytest.raises(ValueError, match="positive"):
        text_overrides({"neighbours": -1.0})


def test_teacher_cache_and_training_resume(tmp_path):
    from models.transformer_text import load_tokenizer, minilm_dir

    tokenizer = load_tokenizer(minilm_dir())
    texts = [f"Return the {w} of the given value number {i}." for i, w in enumerate(["sum", "mean", "size"] * 4)]
    batches = dt.length_batches(texts, batch_size=4)
    teacher = _tiny_encoder(4, seed=0)
    cache = dt.TeacherCache(tmp_path / "cache", layers=(2, 3))
    cache.fill(teacher, tokenizer=tokenizer, texts=texts, batches=batches)
    assert cache.missing(len(batches)) == [] and set(cache.load(0)["hidden"]) == {2, 3}
    settings = {"epochs": 3, "lr": 1e-2, "weights": {"embedding": 1.0, "tokens": 1.0}}

    def run(student, steps: list[int]) -> dict[str, float]:
        return dt.train(student, cache=cache, tokenizer=tokenizer, texts=texts, batches=batches, targets=(2, 3),
                        settings=settings, seed=0, checkpoint=tmp_path / "ckpt.pt",
                        progress=lambda n, postfix=None: steps.append(n))

    student, steps = dt.make_student(copy.deepcopy(teacher), dt.StudentPlan((0, 3))), []
    first = run(student, steps)
    assert sum(steps) == 3 * len(batches) and first["final_embedding_loss"] > 0
    resumed, again = dt.make_student(copy.deepcopy(teacher), dt.StudentPlan((0, 3))), []
    second = run(resumed, again)
    assert again == [3 * len(batches)]  # resumed at the end: no step re-run
    assert second == pytest.approx(first)
    for a, b in zip(student.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_budget_decision_and_no_publish_when_missed(tmp_path):
    assert budget_verdict(cosine=0.96, overlap=0.86, speedup=3.1) == (True, "within budget")
    ok, why = budget_verdict(cosine=0.903, overlap=0.727, speedup=2.97)
    assert not ok and why == ("missed: mean cosine to teacher 0.903 < 0.95, top-10 overlap 0.727 < 0.85, "
                              "speedup at batch 32 2.970 < 3")
    assert budget_verdict(cosine=float("nan"), overlap=0.9, speedup=4.0)[0] is False
    result = StudentResult(family="transformer", model="transformer", onnx_path=tmp_path / "s.onnx",
                           metrics={"cosine_to_fp32": 0.9}, teacher_metrics={}, parameters=1, teacher_parameters=2,
                           within_budget=False, budget="b")
    assert distill.publish_student(result, repo_dir=tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_fractional_epochs_cut_the_last_epoch_short():
    assert dt.total_steps({"epochs": 2}, 10) == 20
    assert dt.total_steps({"epochs": 1.5}, 10) == 15
    assert dt.total_steps({"epochs": 0.01}, 10) == 1
