"""`modelserve predict` at the ceiling: vectorised preparation and post-processing give the per-row results,
columnar parts give the rows the dict path gave, process-pool decoding keeps order, and a pipelined run that
is interrupted resumes without losing or repeating rows."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image, ImageFilter

from service.offline.cli import main
from service.offline.engine import LocalEngine, predict_items
from service.offline.readers import Item, open_input
from service.offline.rows import ColumnSegment, Rows, dict_table
from service.offline.writers import PartWriter
from service.processing.base import Limits
from service.processing.image import ImageProcessor, layout_batch
from service.processing.photo import widen_thin
from service.processing.recommender import RecommenderProcessor
from service.processing.speech import decode_wav
from tests.task_media import digit_file, held_out_digits, keyword_audio, wav_bytes


# --- the per-row MNIST layout as it was before it went batch-wide: the reference the batch must reproduce ---
def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight, mass = np.cumsum(hist).astype(np.float64), np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mass[-1] * weight - weight[-1] * mass) ** 2 / (weight * (weight[-1] - weight))
    between = np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)
    return float(edges[int(np.argmax(between)) + 1]) if between.max() > 0 else 0.5


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def reference_layout(gray: np.ndarray) -> tuple[np.ndarray, bool]:
    deviation = gray - float(np.median(_border(gray)))
    far = np.abs(deviation) >= np.quantile(np.abs(deviation), 0.95)
    inverted = bool(deviation[far].mean() < 0)
    ink = 1.0 - gray if inverted else gray
    paper, top = float(np.median(_border(ink))), float(ink.max())
    out = np.zeros((28, 28), np.float32)
    if top - paper < 1e-3:
        return out[None], inverted
    stretched = np.clip((ink - paper) / (top - paper), 0.0, 1.0)
    ink = np.where(stretched >= _otsu(stretched), stretched, 0.0).astype(np.float32)
    mask = Image.fromarray(((ink > 0) * 255).astype(np.uint8))
    box = mask.filter(ImageFilter.MedianFilter(3)).getbbox() or mask.getbbox()
    if box is None:
        return out[None], inverted
    left, top_, right, bottom = box
    crop = ink[top_:bottom, left:right]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    digit = np.clip(np.asarray(Image.fromarray(square, mode="F").resize((20, 20), Image.Resampling.BILINEAR)), 0, 1)
    digit = widen_thin((digit / max(float(digit.max()), 1e-6))[None])[0]  # round 4's photo step, shared
    rows, cols = np.indices(digit.shape)
    cy, cx = float((rows * digit).sum()) / float(digit.sum()), float((cols * digit).sum()) / float(digit.sum())
    y0, x0 = int(np.clip(round(13.5 - cy), 0, 8)), int(np.clip(round(13.5 - cx), 0, 8))
    out[y0:y0 + 20, x0:x0 + 20] = digit
    return out[None], inverted


def layout_cases() -> np.ndarray:
    """Digits light on dark and dark on light, on noisy paper, a blank page, one speck, a thin stroke."""
    rng = np.random.default_rng(0)
    images8, _, _ = held_out_digits(40)
    grays = []
    for i, im in enumerate(images8):
        g = np.asarray(Image.open(io.BytesIO(digit_file(im, side=48, dark_on_light=i % 2 == 1))), np.float32) / 255
        grays.append(g if i % 3 else np.clip(g * 0.6 + 0.2 + rng.normal(0, 0.05, g.shape), 0, 1).astype(np.float32))
    blank, speck, stroke = (np.zeros((48, 48), np.float32) for _ in range(3))
    speck[20, 30] = 1.0
    stroke[5:40, 12] = 1.0
    return np.stack([*grays, blank, np.full((48, 48), 0.5, np.float32), speck, stroke])


def test_batch_layout_equals_the_per_row_layout():
    grays = layout_cases()
    pixels, inverted = layout_batch(grays)
    want = [reference_layout(g) for g in grays]
    assert inverted.tolist() == [inv for _, inv in want]
    assert inverted.any() and not inverted.all()  # both polarities were exercised
    np.testing.assert_allclose(pixels, np.stack([p for p, _ in want]), atol=1e-5)
    noise = np.random.default_rng(1).random((16, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(layout_batch(noise)[0], np.stack([reference_layout(g)[0] for g in noise]), atol=1e-5)


def test_prepare_batch_keeps_each_item_in_place_and_fails_only_the_bad_one():
    images8, _, _ = held_out_digits(4)
    payloads = [digit_file(images8[0], side=64), b"not an image", digit_file(images8[1], side=32),
                np.zeros((2, 3, 4), np.float32), digit_file(images8[2], side=64)]
    processor = ImageProcessor(input_name="image", output_name="probs", labels=None)
    got = processor.prepare_batch(payloads, indices=[10, 11, 12, 13, 14])
    assert "item 11: not an image" in str(got[1]) and "item 13: expected a 2-D image array" in str(got[3])
    for pos in (0, 2, 4):
        one = processor.prepare(payloads[pos], index=pos)
        np.testing.assert_allclose(got[pos].pixels, one.pixels, atol=1e-6)  # type: ignore[union-attr]
        assert (got[pos].original_size, got[pos].inverted) == (one.original_size, one.inverted)  # type: ignore[union-attr]


@pytest.mark.parametrize(("subtype", "channels", "rate", "endian"), [
    ("PCM_16", 1, 16000, "LITTLE"), ("PCM_16", 2, 22050, "LITTLE"), ("PCM_16", 1, 8000, "BIG"),
    ("PCM_24", 1, 16000, "LITTLE"), ("FLOAT", 2, 44100, "LITTLE")])
def test_wav_decoding_gives_libsndfiles_samples(subtype, channels, rate, endian):
    wave = np.random.default_rng(rate).uniform(-1, 1, (rate // 2, channels)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, subtype=subtype, format="WAV", endian=endian)
    audio, got_rate, got_channels = decode_wav(buf.getvalue(), index=0, limits=Limits())
    want, want_rate = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
    assert (got_rate, got_channels, audio.dtype) == (want_rate, channels, np.float32)
    np.testing.assert_array_equal(audio, want)  # bit for bit, on the read-it-ourselves path too
    with pytest.raises(Exception, match="truncated WAV"):
        decode_wav(buf.getvalue()[:len(buf.getvalue()) // 2], index=0, limits=Limits())


@pytest.fixture()
def recommender(tmp_path) -> RecommenderProcessor:
    (tmp_path / "seen_items.json").write_text(json.dumps({"1": [3, 5, 7], "2": [], "4": [0, 1, 2, 3, 4, 5, 6]}))
    return RecommenderProcessor(model_dir=tmp_path, input_name="user", item_output="items",
                                score_output="scores", top_k=8)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_recommender_columns_equal_the_per_row_filter(recommender, k):
    users = [1, 2, 3, 4, 1, 10**12, -5]
    rng = np.random.default_rng(k)
    items = np.stack([rng.permutation(np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10**6, -1, 3]))[:8] for _ in users])
    scores = np.round(rng.random(items.shape), 1).astype(np.float32)  # ties: the graph's order must stay
    prepared = [recommender.prepare(u, index=i) for i, u in enumerate(users)]
    columns = recommender.postprocess_columns({"items": items, "scores": scores}, prepared, params={"k": k})
    seen = recommender.seen
    for row, (user, got) in enumerate(zip(users, columns.rows())):
        want = [{"item_id": int(it), "score": float(sc)} for it, sc in zip(items[row], scores[row])
                if int(it) not in seen.get(user, set())][:k]
        assert got["items"] == want and got["returned"] == len(want)
        assert ("fallback" in got) == (user not in seen)
    keep_all = recommender.postprocess_columns({"items": items, "scores": scores}, prepared,
                                               params={"k": k, "exclude_seen": False}).rows()
    assert [r["items"] for r in keep_all] == \
        [[{"item_id": int(it), "score": float(sc)} for it, sc in zip(items[r], scores[r])][:k] for r in range(7)]
    # Columnar Arrow = what Arrow infers from the dicts, value for value and type for type.
    assert columns.arrow().equals(pa.array(columns.rows()))


def test_columnar_segments_write_the_rows_of_the_dict_path(recommender, tmp_path):
    users = [Item(0, "a", 1), Item(1, "b", error="bad row"), Item(2, "c", 4), Item(3, "d", 10**9)]
    ready = [recommender.prepare(it.payload, index=it.row) for it in users if it.error is None]
    items = np.tile(np.arange(8), (3, 1))
    columns = recommender.postprocess_columns({"items": items, "scores": np.ones((3, 8), np.float32)}, ready,
                                              params={"k": 2})
    rows = Rows([ColumnSegment(users, [it.error for it in users], columns),
                 [{"row": 4, "id": "e", "ok": False, "error": "unreadable", "result": None}]])
    dicts = rows.dicts()
    assert [r["row"] for r in dicts] == [0, 1, 2, 3, 4] and rows.failed == 2 and len(rows) == 5
    assert dicts[1]["result"] is None and dicts[2]["result"]["items"] == [{"item_id": 7, "score": 1.0}]
    assert rows.table().to_pylist() == dict_table(dicts).to_pylist()
    for name in ("out.parquet", "out.jsonl"):  # both formats, through the part writer
        writer = PartWriter(tmp_path / name, job={}, resume=False)
        writer.commit(rows)
        writer.finish()
        back = (pq.read_table(tmp_path / name).to_pylist() if name.endswith(".parquet") else
                [json.loads(line) for line in (tmp_path / name).read_text().splitlines()])
        assert [_dropped_nulls(r) for r in back] == dicts


def _dropped_nulls(row: dict) -> dict:
    """A Parquet row as the endpoint's object: struct fields a row lacks read back as null."""
    result = row["result"]
    return {**row, "result": {k: v for k, v in result.items() if v is not None} if result else result}


def test_recommender_job_writes_the_per_row_results(tiny_zoo, tmp_path):
    src = tmp_path / "users.jsonl"
    src.write_text("".join(json.dumps({"user_id": u}) + "\n" for u in [1, 2, "x", 10**9, 5, 7, 3, 0] * 4))
    engine = LocalEngine(tiny_zoo / "recommender", batch_size=3, params={"k": 4, "exclude_seen": True})
    try:
        items = list(open_input(src, task=engine.task).items)
        want = [r for s in range(0, len(items), 3) for r in predict_items(engine.model, items[s:s + 3],
                                                                          params=engine.params)]
    finally:
        engine.close()
    common = ["--model", "recommender", "--input", str(src), "--model-repository", str(tiny_zoo), "--k", "4",
              "--batch-size", "3", "--part-rows", "7"]
    for name in ("u.parquet", "u.jsonl"):
        assert main([*common, "--output", str(tmp_path / name)]) == 0
    assert [_dropped_nulls(r) for r in pq.read_table(tmp_path / "u.parquet").to_pylist()] == want
    assert [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()] == want
    assert sum(not r["ok"] for r in want) == 4 and any("fallback" in (r["result"] or {}) for r in want)


@pytest.fixture()
def png_folder(tmp_path):
    images8, _, _ = held_out_digits(30)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(images8):
        (folder / f"d{i:03d}.png").write_bytes(digit_file(im, side=40 + i % 3 * 12, dark_on_light=i % 4 == 0))
    (folder / "d014-broken.png").write_bytes(b"\x89PNG truncated")
    (folder / "d020-notes.txt").write_text("not an image")
    return folder


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [(r["row"], r["id"], r["ok"], r["error"]) for r in got] == \
        [(r["row"], r["id"], r["ok"], r["error"]) for r in want]
    for g, w in zip(got, want):
        if w["ok"]:
            assert [p["label"] for p in g["result"]["predictions"]] == [p["label"] for p in w["result"]["predictions"]]
            np.testing.assert_allclose([p["probability"] for p in g["result"]["predictions"]],
                                       [p["probability"] for p in w["result"]["predictions"]], rtol=1e-4, atol=1e-6)
            assert {k: v for k, v in g["result"].items() if k != "predictions"} == \
                {k: v for k, v in w["result"].items() if k != "predictions"}


@pytest.mark.parametrize("model", ["cnn", "speech"])
def test_process_pool_decode_keeps_order(tiny_zoo, png_folder, tmp_path, model):
    if model == "speech":
        folder = tmp_path / "wavs"
        folder.mkdir()
        for i in range(14):
            word = ("yes", "stop", "left")[i % 3]
            (folder / f"w{i:03d}.wav").write_bytes(wav_bytes(keyword_audio(word), rate=(16000, 22050)[i % 2]))
        (folder / "w005-truncated.wav").write_bytes(wav_bytes(keyword_audio("go"))[:3000])
    else:
        folder = png_folder
    items = list(open_input(folder, task="keyword-spotting" if model == "speech" else "image-classification").items)
    windows = [items[s:s + 7] for s in range(0, len(items), 7)]
    pooled = LocalEngine(tiny_zoo / model, batch_size=3, params={"k": 3}, workers=2, decode_files=True)
    inline = LocalEngine(tiny_zoo / model, batch_size=3, params={"k": 3}, workers=1)
    try:
        got = [row for rows in pooled.predict_windows(windows) for row in rows]
        # the images really went through the worker processes; WAVs are read inline (prepare_inline)
        assert (pooled.decoder is not None) == (model == "cnn")
        want = [row for s in range(0, len(items), 3)
                for row in predict_items(inline.model, items[s:s + 3], params=inline.params)]
    finally:
        pooled.close()
        inline.close()
    assert [r["row"] for r in got] == list(range(len(items)))
    assert sum(not r["ok"] for r in got) >= 1
    assert_same_rows(got, want)


def test_interrupted_pipelined_run_resumes_without_losing_or_repeating_rows(tiny_zoo, png_folder, tmp_path,
                                                                          monkeypatch):
    common = ["--model", "cnn", "--input", str(png_folder), "--model-repository", str(tiny_zoo),
              "--batch-size", "2", "--part-rows", "5", "--workers", "2"]
    assert main([*common, "--output", str(tmp_path / "whole.parquet")]) == 0
    whole = pq.read_table(tmp_path / "whole.parquet").to_pylist()
    assert len(whole) == 32

    # The engine fails on the third window: the two before it are committed (the background writer drains
    # its queue), nothing after.
    out = tmp_path / "out.parquet"
    finish, calls = LocalEngine._finish, []

    def failing_finish(self, pending):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("engine died")
        return finish(self, pending)

    monkeypatch.setattr(LocalEngine, "_finish", failing_finish)
    with pytest.raises(RuntimeError, match="engine died"):
        main([*common, "--output", str(out)])
    progress = json.loads((tmp_path / "out.parquet.parts" / "progress.json").read_text())
    assert (progress["rows"], progress["parts"]) == (10, 2)
    monkeypatch.setattr(LocalEngine, "_finish", finish)

    # Then the writer fails on its next part: what was committed stays, the failed part is not recorded.
    write_rows, writes = PartWriter._write_rows, []

    def failing_write(self, path, rows):
        writes.append(1)
        if len(writes) == 2:
            raise OSError("disk full")
        return write_rows(self, path, rows)

    monkeypatch.setattr(PartWriter, "_write_rows", failing_write)
    with pytest.raises(OSError, match="disk full"):
        main([*common, "--output", str(out), "--resume"])
    progress = json.loads((tmp_path / "out.parquet.parts" / "progress.json").read_text())
    assert (progress["rows"], progress["parts"]) == (15, 3)
    monkeypatch.setattr(PartWriter, "_write_rows", write_rows)

    assert main([*common, "--output", str(out), "--resume"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert [r["row"] for r in rows] == list(range(32))
    assert_same_rows(rows, whole)
