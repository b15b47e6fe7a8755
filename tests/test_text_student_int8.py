"""A wider sentence-encoder student served as INT8 (export.text_student_int8) on a tiny BERT: shape parsing and
which teacher layers it copies, the speed shortlist, the INT8 graph, the served comparison, and the publication
rule (each student variant on its own numbers). No timings are asserted."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch

from export import distill
from export import distill_text_train as dt
from export import text_student_int8 as tsi
from export.distill_common import StudentResult
from export.heldout import HeldOut

transformers = pytest.importorskip("transformers")


def _tiny_encoder(layers: int = 6):
    from models.transformer_text import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=128)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    return SentenceEncoder(bert.eval(), total_layers=layers)


def test_shapes_name_the_teacher_layers_they_copy():
    wide = tsi.parse_shape("4x1536:0,2,4,5", total=6)
    assert wide == tsi.Shape(init_layers=(0, 2, 4, 5), ffn=None) and wide.label() == "4x1536"
    assert wide.plan().hidden_targets(6) == (1, 3, 4, 5)  # each layer learns the input of the next copied one
    assert tsi.parse_shape("4x1536:0,1,3,5", total=6).plan().hidden_targets(6) == (0, 2, 4, 5)
    assert tsi.parse_shape("4 x 1152", total=6) == tsi.Shape(init_layers=(0, 2, 3, 5), ffn=1152)  # spread
    assert tsi.parse_shape("3x1536", total=6).init_layers == (0, 2, 5)
    for bad, message in (("4x1536:0,2,2,5", "increasing"), ("4x1536:0,2,5", "4 increasing"),
                         ("4x1536:0,2,4,6", "0..5"), ("6x1536", "1..5 layers"), ("4x2048", "FFN width"),
                         ("four by 1536", "LAYERSxFFN")):
        with pytest.raises(ValueError, match=message):
            tsi.parse_shape(bad, total=6)


def test_a_four_layer_student_copies_exactly_those_layers_at_full_width():
    teacher = _tiny_encoder(6)
    student = dt.make_student(copy.deepcopy(teacher), tsi.parse_shape("4x32:0,2,4,5", total=6, teacher_ffn=32).plan())
    assert len(student.bert.encoder.layer) == 4 and student.bert.config.intermediate_size == 32
    for j, i in enumerate((0, 2, 4, 5)):
        for mine, theirs in zip(student.bert.encoder.layer[j].parameters(), teacher.bert.encoder.layer[i].parameters()):
            assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="increasing layer indices"):
        dt.check_plan(dt.StudentPlan(init_layers=(0, 3, 3)), total=6)


def test_speed_shortlist_keeps_int8_students_over_the_floor_fastest_first():
    speedups = {"teacher": 1.0, "teacher-int8": 4.0, "4x1536[0,2,4,5]": 1.5, "4x1536[0,2,4,5]-int8": 3.4,
                "3x1536[0,2,5]-int8": 4.5, "4x1152[0,2,3,5]-int8": 3.29}
    assert tsi.fast_enough(speedups) == ["3x1536[0,2,5]", "4x1536[0,2,4,5]"]
    assert tsi.fast_enough(speedups, floor=5.0) == []


def test_each_served_variant_is_judged_on_its_own_numbers():
    rows = {"student": {"cosine": 0.96, "top10_overlap": 0.88, "speedup": 1.6},
            "student-int8": {"cosine": 0.955, "top10_overlap": 0.86, "speedup": 3.4}}
    verdicts = tsi.served_verdicts(rows)
    assert verdicts["student-int8"] == (True, "student-int8: published, within budget")
    assert verdicts["student"][0] is False and "speedup at batch 32 1.600 < 3" in verdicts["student"][1]
    rows["student-int8"]["top10_overlap"] = 0.84  # the FP32 student's better overlap does not carry over
    ok, why = tsi.served_verdicts(rows)["student-int8"]
    assert not ok and why == "student-int8: not published, missed: top-10 overlap 0.840 < 0.85"


def _texts() -> list[str]:
    words = ["sum", "mean", "size", "path", "file", "list", "name", "time", "date", "user", "error", "value"]
    return [f"Return the {w} of the given {v} in order." for w in words for v in ("item", "record")]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from models.transformer_text import IndexedEmbedding, export_text_model, load_tokenizer, minilm_dir, tokenize

    work = tmp_path_factory.mktemp("tsi")
    tokenizer = load_tokenizer(minilm_dir())
    encoder = _tiny_encoder(2)
    emb = encoder.bert.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):  # as load_encoder does
        setattr(emb, name, IndexedEmbedding(getattr(emb, name)))
    path, _ = export_text_model(encoder, tokenizer=tokenizer, path=work / "tiny.onnx", output_name="embedding")
    ids, mask = tokenize(tokenizer, _texts())
    heldout = HeldOut("transformer", [{"input_ids": ids, "attention_mask": mask}], None, [])
    return work, path, heldout


def test_int8_dynamic_runs_integer_matmuls(tiny_onnx):
    from export.heldout import run_outputs

    work, path, heldout = tiny_onnx
    out = tsi.int8_dynamic(path, work_dir=work / "q")
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    q = tsi.fidelity(run_outputs(path, heldout.feeds)[0], run_outputs(out, heldout.feeds)[0])
    assert 0.9 < q["cosine"] <= 1.0 + 1e-9 and 0.0 <= q["top10_overlap"] <= 1.0


def test_served_comparison_against_both_teachers(tiny_onnx):
    from export.heldout import run_outputs

    work, path, heldout = tiny_onnx
    reference = run_outputs(path, heldout.feeds)[0]
    # The teacher itself as the "student": FP32 matches the FP32 teacher, its INT8 matches the teacher's INT8.
    got = tsi.served_comparison(teacher=path, student=path, heldout=heldout, reference=reference,
                                work_dir=work / "served", repeats=1)
    assert set(got["latency_ms"]) == {"teacher", "teacher-int8", "student", "student-int8"}
    assert got["vs_teacher"]["student"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got["vs_teacher_int8"]["student-int8"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got["vs_teacher_int8"]["student-int8"]["top10_overlap"] == 1.0
    assert got["vs_teacher"]["student-int8"]["cosine"] < 1.0  # quantization moved it, a little
    for name in ("student", "student-int8"):
        assert got["publish"][name] == tsi.served_verdicts({name: got["rows"][name]})[name][0]
        assert got["why"][name].startswith(f"{name}: ")
    json.dumps(got)  # goes into the report and the model card as is


def _result(tmp_path, *, int8_ok: bool, onnx_path) -> StudentResult:
    served = {"publish": {"student": False, "student-int8": int8_ok}, "paths": {"student-int8": str(onnx_path)},
              "rows": {"student-int8": {"cosine": 0.96, "cosine_min": 0.8, "top10_overlap": 0.87, "speedup": 3.4}},
              "latency_ms": {"teacher": 10.0, "student-int8": 3.0},
              "why": {"student-int8": "student-int8: published, within budget"}}
    return StudentResult(family="transformer", model="transformer", onnx_path=tmp_path / "s.onnx",
                         metrics={"cosine_to_fp32": 0.94}, teacher_metrics={}, parameters=1, teacher_parameters=2,
                         within_budget=False, budget="b", details={"served": served, "ffn": None})


def test_only_a_variant_within_budget_as_served_is_published(tmp_path, tiny_onnx):
    from export.common import variant_name

    _, path, _ = tiny_onnx
    repo = tmp_path / "repo"
    (repo / "transformer" / "1").mkdir(parents=True)
    (repo / "transformer" / "1" / "model.onnx").write_bytes(path.read_bytes())
    (repo / "transformer" / "config.pbtxt").write_text(
        'name: "transformer"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\ninput [\n'
        '  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },\n'
        '  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
        'output [ { name: "embedding" data_type: TYPE_FP32 dims: [ 16 ] } ]\n')
    (repo / "transformer" / "metrics.json").write_text(json.dumps(
        {"family": "transformer", "profile": "tiny", "seed": 0, "parameters": 2, "task": "embedding", "data": "d",
         "split": "s",
         "input_spec": {"encoder_layers": "2 of 2"}}))
    missed = _result(tmp_path, int8_ok=False, onnx_path=path)
    assert distill.publish_student(missed, repo_dir=repo) is None
    assert distill.publish_student_int8(missed, repo_dir=repo) is None
    assert sorted(p.name for p in repo.iterdir()) == ["transformer"]
    published = distill.publish_student_int8(_result(tmp_path, int8_ok=True, onnx_path=path), repo_dir=repo)
    assert published is not None and published.name == variant_name("transformer", "student-int8")
    card = json.loads((published / "metrics.json").read_text())
    assert card["variant"] == "student-int8" and card["metrics"]["top10_retrieval_overlap"] == 0.87
    assert card["why"] == "student-int8: published, within budget"
