"""`modelserve predict`'s pipeline: text batched by token length yet written in input order, batch top-k equal
to per-row top-k, and --resume unchanged by the sorting."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.offline.cli import main
from service.offline.engine import LocalEngine, length_order, predict_items
from service.offline.readers import open_input
from service.processing.base import top_k, top_k_rows

WORDS = "the quick brown fox jumps over a lazy dog while seven zebras quietly graze near old river banks".split()


def write_texts(path, *, rows: int) -> None:
    """Texts whose lengths jump about (1..60 words), one empty (a bad row), so sorting reorders every batch."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(rows):
        words = rng.choice(WORDS, size=int(rng.integers(1, 60)))
        lines.append({"id": f"t{i}", "text": "" if i == 7 else " ".join(words)})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def read(path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return pq.read_table(path).to_pylist()


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same rows, order and results; model outputs equal up to float noise (a row's padding differs)."""
    assert [(r["row"], r["id"], r["ok"], r["error"]) for r in got] == \
        [(r["row"], r["id"], r["ok"], r["error"]) for r in want]
    for g, w in zip(got, want):
        if not w["ok"]:
            continue
        gr, wr = g["result"], w["result"]
        assert {k: gr[k] for k in ("tokens", "tokens_used", "truncated")} == \
            {k: wr[k] for k in ("tokens", "tokens_used", "truncated")}
        if "predictions" in wr:
            assert [p["label"] for p in gr["predictions"]] == [p["label"] for p in wr["predictions"]]
            np.testing.assert_allclose([p["probability"] for p in gr["predictions"]],
                                       [p["probability"] for p in wr["predictions"]], rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(gr["embedding"], wr["embedding"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["transformer-classifier", "transformer"])
def test_sorted_by_length_gives_the_unsorted_rows_in_input_order(tiny_zoo, tmp_path, model):
    src = tmp_path / "texts.jsonl"
    write_texts(src, rows=40)
    engine = LocalEngine(tiny_zoo / model, batch_size=4, params={"k": 3, "exclude_seen": True}, workers=2)
    widths: list[int] = []
    collate = engine.model.processor.collate
    engine.model.processor.collate = lambda prepared: widths.append(max(len(p.ids) for p in prepared)) \
        or collate(prepared)  # type: ignore[method-assign]
    try:
        items = list(open_input(src, task=engine.task).items)
        got = engine.predict(items)
        sorted_widths = list(widths)
        widths.clear()
        want = [row for s in range(0, len(items), 4)
                for row in predict_items(engine.model, items[s:s + 4], params=engine.params)]
    finally:
        engine.close()
    assert sorted_widths == sorted(sorted_widths)  # batches really went shortest first ...
    assert sum(sorted_widths) < sum(widths)  # ... and padded less than input order does
    assert_same_rows(got, want)
    assert got[7]["error"] == "text 7 is empty; expected non-empty text"

    # The CLI writes the same rows.
    assert main(["--model", model, "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                 "--model-repository", str(tiny_zoo), "--batch-size", "4", "--k", "3"]) == 0
    assert_same_rows(read(tmp_path / "out.jsonl"), want)


def test_interrupted_sorted_run_resumes_without_losing_or_repeating_rows(tiny_zoo, tmp_path):
    src = tmp_path / "texts.jsonl"
    write_texts(src, rows=45)
    common = ["--model", "transformer-classifier", "--input", str(src), "--model-repository", str(tiny_zoo),
              "--batch-size", "4", "--part-rows", "8"]
    assert main([*common, "--output", str(tmp_path / "whole.parquet")]) == 0
    out = tmp_path / "resumed.parquet"
    assert main([*common, "--output", str(out), "--max-rows", "20"]) == 0
    assert not out.exists() and (tmp_path / "resumed.parquet.parts").is_dir()  # interrupted: parts only
    assert main([*common, "--output", str(out), "--resume"]) == 0
    rows = read(out)
    assert [r["row"] for r in rows] == list(range(45))
    assert_same_rows(rows, read(tmp_path / "whole.parquet"))


def test_length_order_is_stable_and_leaves_other_rows_alone():
    class P:
        def __init__(self, n: int) -> None:
            self.ids = list(range(n))

    assert length_order([P(3), P(1), P(3), P(2)]) == [1, 3, 0, 2]
    assert length_order([np.zeros(3), np.zeros(1)]) == [0, 1]


@pytest.mark.parametrize("k", [1, 3, 10, 12])
def test_batch_top_k_equals_per_row_top_k_ties_included(k):
    rng = np.random.default_rng(k)
    labels = [f"c{i}" for i in range(10)]
    probs = np.concatenate([rng.random((50, 10), dtype=np.float32),
                            np.round(rng.random((50, 10)), 1).astype(np.float32),  # many ties
                            np.full((3, 10), 0.1, np.float32)])
    assert top_k_rows(probs, labels=labels, k=k) == [top_k(row, labels=labels, k=k) for row in probs]
    assert top_k_rows(probs, labels=None, k=k) == [top_k(row, labels=None, k=k) for row in probs]
    assert top_k_rows(probs[:0], labels=labels, k=k) == []


def test_recommender_batch_postprocess_matches_the_graph_row_by_row(tiny_zoo):
    engine = LocalEngine(tiny_zoo / "recommender", batch_size=8, params={"k": 5, "exclude_seen": True})
    try:
        model = engine.model
        users = [0, 1, 2, 3, 10**9, 7]
        prepared = [model.processor.prepare(u, index=i) for i, u in enumerate(users)]
        items, scores = model.session.run(model.output_names, model.processor.collate(prepared))
        got = model.processor.postprocess({model.output_names[0]: items, model.output_names[1]: scores},
                                          prepared, params={"k": 5})
        seen = model.processor.seen  # type: ignore[attr-defined]
    finally:
        engine.close()
    for i, user in enumerate(users):
        want = [{"item_id": int(it), "score": float(sc)} for it, sc in zip(items[i], scores[i])
                if int(it) not in seen.get(user, set())][:5]
        assert got[i]["items"] == want and got[i]["returned"] == len(want)
        assert all(type(p["item_id"]) is int and type(p["score"]) is float for p in got[i]["items"])
        assert ("fallback" in got[i]) == (user not in seen)
