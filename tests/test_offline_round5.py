"""`modelserve predict`, round 5: image results built as columns (identical to `top_k` row by row, and to the
Parquet type Arrow infers from the dicts); cnn `.npy` and PNG jobs write exactly the output of the dict path, in
order, bad rows included."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.offline import engine
from service.offline.cli import main
from service.offline.engine import run_prepared
from service.processing.base import top_k
from service.processing.image import ImageColumns, ImageProcessor, PreparedImage
from service.processing.photo import _max3, widen_thin
from tests.task_media import digit_file, held_out_digits


def tied_probs(rows: int, classes: int, *, seed: int = 0) -> np.ndarray:
    """Random scores with ties: a flat row, a row whose best values tie, equal values across the k-th place."""
    probs = np.random.default_rng(seed).random((rows, classes)).astype(np.float32)
    probs[1] = 0.25
    probs[2, :5] = probs[2].max()
    probs[3, ::2] = probs[3, 1]
    return probs


@pytest.mark.parametrize("labels", [None, [f"digit {i}" for i in range(10)], ["zero", "one"]])
@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_image_columns_are_top_k_row_by_row_and_arrows_inferred_type(labels, k):
    if labels is not None and k > len(labels):
        k = len(labels)
    processor = ImageProcessor(input_name="x", output_name="probs", labels=labels)
    probs = tied_probs(9, 10)
    prepared = [PreparedImage(np.zeros((1, 28, 28), np.float32), (20 + i, 30 - i), i % 3 == 0) for i in range(9)]
    columns = processor.postprocess_columns({"probs": probs}, prepared, params={"k": k})
    expected = [{"predictions": top_k(row, labels=labels, k=k),
                 "preprocessing": {"original_size": [20 + i, 30 - i], "inverted": i % 3 == 0}}
                for i, row in enumerate(probs)]
    assert columns.rows() == expected
    assert processor.postprocess({"probs": probs}, prepared, params={"k": k}) == expected  # the server's path
    inferred = pa.array(expected)
    built = columns.arrow()
    assert built.type == inferred.type and built.equals(inferred)
    joined = ImageColumns.concat([columns, columns])
    assert joined is not None and joined.rows() == expected + expected
    other_k = processor.postprocess_columns({"probs": probs}, prepared, params={"k": 1 if k > 1 else 2})
    assert ImageColumns.concat([columns, other_k]) is None  # another k cannot share the columns


def dict_path(monkeypatch) -> None:
    """Every batch's results as the endpoint's dicts (`postprocess`), as before this round."""
    def dicts(model, items, ready, *, params):
        return run_prepared(model, items, ready, params=params, batch_size=max(len(items), 1), by_length=False)

    monkeypatch.setattr(engine, "run_segment", dicts)


def run_both(monkeypatch, tmp_path, args: list[str], *, out: str):
    assert main([*args, "--output", str(tmp_path / f"cols-{out}")]) in (0, 1)
    with monkeypatch.context() as m:
        dict_path(m)
        assert main([*args, "--output", str(tmp_path / f"dicts-{out}")]) in (0, 1)
    return tmp_path / f"cols-{out}", tmp_path / f"dicts-{out}"


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_cnn_npy_job_writes_the_dict_paths_output(tiny_zoo, tmp_path, monkeypatch, fmt):
    rows = np.random.default_rng(3).random((23, 28, 28), dtype=np.float32)
    rows[5, 3, 3] = np.nan  # refused alone
    rows[9] = 0.0  # blank
    np.save(tmp_path / "x.npy", rows)
    args = ["--model", "cnn", "--input", str(tmp_path / "x.npy"), "--model-repository", str(tiny_zoo),
            "--batch-size", "4", "--part-rows", "10", "--k", "2"]
    cols, dicts = run_both(monkeypatch, tmp_path, args, out=f"o.{fmt}")
    if fmt == "jsonl":
        assert cols.read_bytes() == dicts.read_bytes()
        return
    a, b = pq.read_table(cols), pq.read_table(dicts)
    assert a.schema == b.schema and a.to_pylist() == b.to_pylist()
    got = a.to_pylist()
    assert [r["row"] for r in got] == list(range(23)) and [r["ok"] for r in got].count(False) == 1
    assert "expected finite pixel values" in got[5]["error"]
    assert got[0]["result"]["preprocessing"] == {"original_size": [28, 28], "inverted": False}
    assert [len(r["result"]["predictions"]) for r in got if r["ok"]] == [2] * 22


def test_cnn_png_job_writes_the_dict_paths_output(tiny_zoo, tmp_path, monkeypatch):
    images, _, _ = held_out_digits(9)
    folder = tmp_path / "png"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"{i:02d}.png").write_bytes(digit_file(image, side=(64, 40, 28)[i % 3], dark_on_light=i % 2 == 1))
    (folder / "04b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = ["--model", "cnn", "--input", str(folder), "--model-repository", str(tiny_zoo), "--batch-size", "4",
            "--workers", "1"]
    cols, dicts = run_both(monkeypatch, tmp_path, args, out="o.parquet")
    a, b = pq.read_table(cols), pq.read_table(dicts)
    assert a.schema == b.schema and a.to_pylist() == b.to_pylist()
    got = a.to_pylist()
    assert [r["id"] for r in got][4:6] == ["04.png", "04b.png"] and not got[5]["ok"]
    assert [r["result"]["preprocessing"]["inverted"] for r in got if r["ok"]] == [i % 2 == 1 for i in range(9)]


@pytest.mark.parametrize("shape", [(32, 20, 20), (1, 20, 20), (5, 3, 4), (7, 1, 1)])
def test_widening_max_is_the_sliding_windows_max_bit_for_bit(shape):
    digits = np.random.default_rng(4).random(shape, dtype=np.float32)
    digits[digits < 0.7] = 0.0
    digits[0, 0, 0] = 1.0  # a maximum on the border
    padded = np.pad(digits, ((0, 0), (1, 1), (1, 1)))
    window = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2)).max(axis=(-2, -1))
    got = _max3(digits)
    assert got.dtype == window.dtype and np.array_equal(got, window)


def test_thin_strokes_are_widened_as_before():
    digits = np.zeros((3, 20, 20), np.float32)
    digits[0, 2:18, 9] = 1.0  # a one-pixel stroke, 16 tall: 3 x 18 = 54 after one widening, 5 x 20 after two
    digits[1, 2:18, 5:10] = 0.9  # 80 pixels: not thin
    digits[2, 4:16, 8:11] = 0.6  # 36 pixels: widened once (5 x 14 = 70)
    widened = widen_thin(digits)
    assert np.count_nonzero(widened[0] > 0.5) == 5 * 20
    assert np.array_equal(widened[1], digits[1])
    assert np.count_nonzero(widened[2] > 0.5) == 5 * 14


def test_npy_window_laid_out_in_chunks_gives_each_batchs_rows(tiny_zoo, tmp_path, monkeypatch):
    rows = np.random.default_rng(5).random((45, 28, 28), dtype=np.float32)
    rows[2, 0, 0] = np.inf  # in the first batch, laid out alone
    rows[21, 5, 5] = np.nan  # in a later chunk
    np.save(tmp_path / "x.npy", rows)
    calls = []
    real = engine.prepare_images

    def counted(gray, *, rows):
        calls.append(len(gray))
        return real(gray, rows=rows)

    monkeypatch.setattr(engine, "prepare_images", counted)
    args = ["--model", "cnn", "--input", str(tmp_path / "x.npy"), "--model-repository", str(tiny_zoo),
            "--batch-size", "4", "--part-rows", "40"]
    monkeypatch.setattr(engine, "LAYOUT_ROWS", 1)  # one model batch at a time, as before chunks
    assert main([*args, "--output", str(tmp_path / "batches.jsonl")]) == 0
    assert calls == [4] * 10 + [4, 1]
    calls.clear()
    monkeypatch.setattr(engine, "LAYOUT_ROWS", 14)  # chunks of 12 rows after the first batch
    assert main([*args, "--output", str(tmp_path / "chunks.jsonl")]) == 0
    assert calls == [4, 12, 12, 12, 4, 1]  # window 1: the first batch, then chunks of 12; window 2: 4 + 1
    assert (tmp_path / "chunks.jsonl").read_bytes() == (tmp_path / "batches.jsonl").read_bytes()
    got = [json.loads(line) for line in (tmp_path / "chunks.jsonl").read_text().splitlines()]
    assert [r["row"] for r in got] == list(range(45))
    assert [r["row"] for r in got if not r["ok"]] == [2, 21]
