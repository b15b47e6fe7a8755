"""`modelserve predict` on whole windows read as arrays (service/offline/columnar.py): Parquet user ids and `.npy`
images give exactly the rows of the row-by-row path (same bytes of JSONL, same Parquet), in order, and resume
without losing or repeating rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.offline.cli import main
from service.offline.columnar import ImageBlock, UserBlock, UserSegment, parquet_user_blocks
from service.offline.engine import LocalEngine
from service.offline.readers import NO_FIELD_ERROR


def row_by_row(monkeypatch) -> None:
    """The engine offers no array windows: the CLI reads Items as before columnar.py."""
    monkeypatch.setattr(LocalEngine, "blocks", lambda self, path, **kw: None)


def users_parquet(path, *, zoo, rows: int = 23, row_group_size: int = 3) -> list:
    """User ids known and unknown to the tiny recommender, two rows without a user_id, string ids with gaps;
    small row groups so windows straddle the file's batches."""
    seen = json.loads((zoo / "recommender" / "seen_items.json").read_text())
    known = sorted(int(u) for u in seen)[:5]
    users = [known[i % len(known)] if i % 4 else 10**9 + i for i in range(rows)]
    for missing in (6, 13):
        if missing < rows:
            users[missing] = None
    ids = [None if i % 5 == 0 else f"u{i}" for i in range(rows)]
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "user_id": pa.array(users, pa.int32())}), path,
                   row_group_size=row_group_size)
    return users


def run_both(monkeypatch, tmp_path, args: list[str], *, out: str) -> tuple:
    """The job's output files with array windows and row by row."""
    assert main([*args, "--output", str(tmp_path / f"cols-{out}")]) in (0, 1)
    with monkeypatch.context() as m:
        row_by_row(m)
        assert main([*args, "--output", str(tmp_path / f"rows-{out}")]) in (0, 1)
    return tmp_path / f"cols-{out}", tmp_path / f"rows-{out}"


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommender_parquet_windows_write_the_row_by_row_output(tiny_zoo, tmp_path, monkeypatch, exclude_seen):
    src = tmp_path / "users.parquet"
    users_parquet(src, zoo=tiny_zoo)
    engine = LocalEngine(tiny_zoo / "recommender", batch_size=4, params={})
    try:  # this input does take the array path
        assert isinstance(next(engine.blocks(src, start=0, part_rows=10, limit=None)), UserBlock)
    finally:
        engine.close()
    args = ["--model", "recommender", "--input", str(src), "--model-repository", str(tiny_zoo), "--k", "3",
            "--batch-size", "4", "--part-rows", "10", *([] if exclude_seen else ["--include-seen"])]
    cols, rows = run_both(monkeypatch, tmp_path, args, out="u.jsonl")
    assert cols.read_bytes() == rows.read_bytes()
    got = [json.loads(line) for line in cols.read_text().splitlines()]
    assert [r["row"] for r in got] == list(range(23))
    assert [r["id"] for r in got[:6]] == ["0", "u1", "u2", "u3", "u4", "5"]
    assert [r["error"] for r in got if not r["ok"]] == [NO_FIELD_ERROR] * 2
    assert got[0]["result"]["fallback"] == "popular" and "fallback" not in got[1]["result"]

    cols, rows = run_both(monkeypatch, tmp_path, args, out="u.parquet")
    a, b = pq.read_table(cols), pq.read_table(rows)
    assert a.schema == b.schema and a.to_pylist() == b.to_pylist()


def test_windows_start_and_end_where_the_row_by_row_reader_puts_them(tmp_path):
    src = tmp_path / "u.parquet"
    pq.write_table(pa.table({"user_id": pa.array(range(100, 123), pa.int64())}), src, row_group_size=3)
    blocks = list(parquet_user_blocks(src, start=5, part_rows=4, limit=9))
    assert [b.rows.tolist() for b in blocks] == [[5, 6, 7, 8], [9, 10, 11, 12], [13]]
    assert [b.user_ids.tolist() for b in blocks][1] == [109, 110, 111, 112]
    assert blocks[2].ids.to_pylist() == ["13"] and not any(b.missing.any() for b in blocks)


@pytest.mark.parametrize("columns", [
    {"user_id": pa.array([1, 2], pa.float64())},  # float ids: prepare's own checks, row by row
    {"user_id": pa.array([1, 2], pa.uint64())},  # may exceed int64
    {"user_id": pa.array([1, 2]), "id": pa.array([1.5, 2.0])},  # str() of a float is Python's
    {"user_id": pa.array([1, 2]), "path": pa.array(["a.png", None])},  # a row without user_id reads its file
])
def test_other_parquet_columns_go_row_by_row(tmp_path, columns):
    src = tmp_path / "u.parquet"
    pq.write_table(pa.table(columns), src)
    assert parquet_user_blocks(src, start=0, part_rows=8, limit=None) is None


def test_interrupted_recommender_job_resumes_from_its_last_part(tiny_zoo, tmp_path, monkeypatch):
    src = tmp_path / "users.parquet"
    users_parquet(src, zoo=tiny_zoo, rows=30)
    common = ["--model", "recommender", "--input", str(src), "--model-repository", str(tiny_zoo),
              "--batch-size", "3", "--part-rows", "7"]
    assert main([*common, "--output", str(tmp_path / "whole.parquet")]) == 0
    out = tmp_path / "out.parquet"
    assert main([*common, "--output", str(out), "--max-rows", "9"]) == 0  # parts of 7 and 2 rows
    assert json.loads((tmp_path / "out.parquet.parts" / "progress.json").read_text())["rows"] == 9
    assert main([*common, "--output", str(out), "--resume", "--max-rows", "21"]) == 0  # all that is left
    assert not (tmp_path / "out.parquet.parts").exists()  # the input is exhausted: assembled
    assert pq.read_table(out).to_pylist() == pq.read_table(tmp_path / "whole.parquet").to_pylist()


def test_runtime_failure_fails_its_own_batch(tiny_zoo, tmp_path, monkeypatch):
    src = tmp_path / "users.parquet"
    users_parquet(src, zoo=tiny_zoo, rows=9)
    engine = LocalEngine(tiny_zoo / "recommender", batch_size=3, params={"k": 2})
    real, calls = engine.model.session.run, []

    def second_batch_fails(names, feeds):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("runtime fell over")
        return real(names, feeds)

    try:
        block = next(engine.blocks(src, start=0, part_rows=9, limit=None))
        monkeypatch.setattr(engine.model.session, "run", second_batch_fails)
        (segment,) = engine._finish(engine._start(block)).segments
    finally:
        engine.close()
    assert isinstance(segment, UserSegment)
    rows = segment.dicts()
    assert [r["ok"] for r in rows] == [True, True, True, False, False, False, False, True, True]
    assert rows[3]["error"] == "RuntimeError: runtime fell over" and rows[6]["error"] == NO_FIELD_ERROR
    assert segment.table().to_pylist() == pa.Table.from_pylist(rows, schema=segment.table().schema).to_pylist()


@pytest.mark.parametrize("dtype,shape", [(np.float32, (28, 28)), (np.uint8, (1, 28, 28))])
def test_npy_windows_give_the_row_by_row_output(tiny_zoo, tmp_path, monkeypatch, dtype, shape):
    rng = np.random.default_rng(3)
    images = rng.random((11, *shape), dtype=np.float32)
    images[:, ..., 8:20, 10:14] += 1.5  # a stroke on the noise
    images[2] = 0  # a blank image
    src = tmp_path / "x.npy"
    np.save(src, (np.clip(images, 0, 1) * 255).astype(np.uint8) if dtype == np.uint8 else images)
    engine = LocalEngine(tiny_zoo / "cnn", batch_size=4, params={})
    try:
        assert isinstance(next(engine.blocks(src, start=0, part_rows=5, limit=None)), ImageBlock)
    finally:
        engine.close()
    args = ["--model", "cnn", "--input", str(src), "--model-repository", str(tiny_zoo), "--batch-size", "4",
            "--part-rows", "5", "--k", "3"]
    cols, rows = run_both(monkeypatch, tmp_path, args, out="x.jsonl")
    assert cols.read_bytes() == rows.read_bytes()
    got = [json.loads(line) for line in cols.read_text().splitlines()]
    assert [r["row"] for r in got] == list(range(11)) and all(r["ok"] for r in got)
    assert got[0]["result"]["preprocessing"]["original_size"] == [28, 28]

    out = tmp_path / "x.parquet"  # resumed from a part boundary, the same rows as one whole run
    assert main([*args, "--output", str(out), "--max-rows", "5"]) == 0
    assert main([*args, "--output", str(out), "--resume"]) == 0
    assert pq.read_table(out).to_pylist() == got


def test_npy_of_non_image_rows_goes_row_by_row(tiny_zoo, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((3, 784), np.float32))
    engine = LocalEngine(tiny_zoo / "cnn", batch_size=4, params={})
    try:
        assert engine.blocks(tmp_path / "flat.npy", start=0, part_rows=5, limit=None) is None
    finally:
        engine.close()
    assert main(["--model", "cnn", "--input", str(tmp_path / "flat.npy"), "--model-repository", str(tiny_zoo),
                 "--output", str(tmp_path / "o.jsonl")]) == 1
    errors = [json.loads(line)["error"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert errors == ["item 0: expected a 2-D image array, got shape [784]", *errors[1:]] and len(errors) == 3


def test_seen_pairs_bitmap_and_sorted_lookup_agree(tiny_zoo):
    engine = LocalEngine(tiny_zoo / "recommender", batch_size=4, params={})
    try:
        processor = engine.model.processor
        users = np.array([*sorted(processor.seen)[:40], 10**12, -3], np.int64)
        outputs = dict(zip(engine.model.output_names,
                           engine.model.session.run(engine.model.output_names, processor.collate_ids(users))))
        assert processor._seen_bits is not None
        bitmap = processor.columns_for(outputs, users, params={"k": 5}).rows()
        processor._seen_bits = None
        assert processor.columns_for(outputs, users, params={"k": 5}).rows() == bitmap
    finally:
        engine.close()
    for row, user in zip(bitmap, users.tolist()):
        assert not {p["item_id"] for p in row["items"]} & processor.seen.get(user, set())
