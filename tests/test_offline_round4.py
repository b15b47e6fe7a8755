"""`modelserve predict`, round 4: a one-part job goes straight to its output (no writer thread, parts folder,
progress record or assembly) and gives the rows a many-part run gives, in order; an interrupted one leaves
nothing and resumes whole; speech results are built as columns (identical to `top_k` row by row, and to the
Parquet type inferred from the dicts); the folder listing is rglob's, sorted as Path sorts; the recommender's
seen (user, item) keys are built with numpy as round 3 built them in Python."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.offline import cli, writers
from service.offline.cli import main
from service.offline.engine import LocalEngine
from service.offline.readers import Item, folder_files, folder_suffixes
from service.offline.rows import ColumnSegment, Rows, _joined, dict_table
from service.processing.base import top_k
from service.processing.recommender import RecommenderProcessor, _seen_keys
from service.processing.speech import SpeechProcessor
from tests.task_media import keyword_audio, wav_bytes
from tests.test_offline_columnar import users_parquet


@pytest.fixture()
def wavs(tmp_path):
    """Clips in a nested folder (rows sorted by path parts), one truncated and one not a WAV."""
    root = tmp_path / "wavs"
    (root / "b").mkdir(parents=True)
    for i in range(11):
        where = root / "b" if i % 3 == 0 else root
        word = ("yes", "stop", "left", "go")[i % 4]
        (where / f"w{i:02d}.wav").write_bytes(wav_bytes(keyword_audio(word)[:11000 + 301 * i],
                                                        rate=(16000, 16000, 22050)[i % 3]))
    (root / "a-truncated.wav").write_bytes(wav_bytes(keyword_audio("go"))[:3000])
    (root / "notes.txt").write_text("not audio")
    return root


def no_background_writer(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a one-part job started a writer thread")

    monkeypatch.setattr(cli, "BackgroundWriter", refuse)


def predict(zoo, model: str, src, out, *extra: str) -> int:
    return main(["--model", model, "--input", str(src), "--output", str(out), "--model-repository", str(zoo),
                 "--batch-size", "4", *extra])


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_one_part_wav_job_writes_the_output_straight_and_equals_many_parts(tiny_zoo, wavs, tmp_path, monkeypatch,
                                                                         fmt):
    many = tmp_path / f"many.{fmt}"
    assert predict(tiny_zoo, "speech", wavs, many, "--part-rows", "3") == 0
    made = []
    mkdir = type(tmp_path).mkdir
    monkeypatch.setattr(type(tmp_path), "mkdir", lambda self, *a, **kw: (made.append(self), mkdir(self, *a, **kw)))
    no_background_writer(monkeypatch)
    one = tmp_path / f"one.{fmt}"
    assert predict(tiny_zoo, "speech", wavs, one) == 0  # 13 rows, parts of 2048
    assert not any(p.name.endswith(".parts") for p in made)  # no parts folder was ever made
    rows = pq.read_table(one).to_pylist() if fmt == "parquet" else one.read_bytes()
    assert rows == (pq.read_table(many).to_pylist() if fmt == "parquet" else many.read_bytes())
    if fmt == "parquet":
        ids = [r["id"] for r in rows]
        assert ids == sorted(ids, key=lambda i: i.split("/")) and ids[0] == "a-truncated.wav" and "b/w00.wav" in ids
        assert [r["row"] for r in rows] == list(range(13))
        assert not rows[0]["ok"] and "truncated WAV" in rows[0]["error"]
        assert rows[ids.index("notes.txt")]["error"].startswith("notes.txt: skipped, not a WAV file")
        assert all(r["ok"] for r in rows if r["id"].endswith(".wav") and r["id"] != "a-truncated.wav")
    assert predict(tiny_zoo, "speech", wavs, one) == 2  # refuses to overwrite a finished output


def test_interrupted_one_part_job_leaves_nothing_and_resumes_whole(tiny_zoo, tmp_path, monkeypatch):
    src = tmp_path / "users.parquet"
    users_parquet(src, zoo=tiny_zoo, rows=23)
    whole = tmp_path / "whole.parquet"
    assert predict(tiny_zoo, "recommender", src, whole, "--part-rows", "5") == 0
    out = tmp_path / "out.parquet"
    finish = LocalEngine._finish

    def failing_finish(self, pending):
        raise RuntimeError("engine died")

    monkeypatch.setattr(LocalEngine, "_finish", failing_finish)
    with pytest.raises(RuntimeError, match="engine died"):
        predict(tiny_zoo, "recommender", src, out)
    assert not out.exists() and not (tmp_path / "out.parquet.parts").exists()
    monkeypatch.setattr(LocalEngine, "_finish", finish)

    write_rows = writers.PartWriter._write_rows

    def failing_write(self, path, rows, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writers.PartWriter, "_write_rows", failing_write)
    with pytest.raises(OSError, match="disk full"):
        predict(tiny_zoo, "recommender", src, out, "--resume")
    assert not out.exists() and not (tmp_path / "out.parquet.parts").exists()
    monkeypatch.setattr(writers.PartWriter, "_write_rows", write_rows)

    no_background_writer(monkeypatch)
    assert predict(tiny_zoo, "recommender", src, out, "--resume") == 0
    assert pq.read_table(out).to_pylist() == pq.read_table(whole).to_pylist()
    assert [r["row"] for r in pq.read_table(out).to_pylist()] == list(range(23))


def test_a_job_cut_by_max_rows_or_resumed_from_parts_still_commits_parts(tiny_zoo, tmp_path):
    src = tmp_path / "users.parquet"
    users_parquet(src, zoo=tiny_zoo, rows=23)
    whole = tmp_path / "whole.parquet"
    assert predict(tiny_zoo, "recommender", src, whole) == 0
    out = tmp_path / "out.parquet"
    assert predict(tiny_zoo, "recommender", src, out, "--max-rows", "10") == 0  # fits a part, but is not the job
    assert not out.exists() and (tmp_path / "out.parquet.parts" / "progress.json").is_file()
    assert predict(tiny_zoo, "recommender", src, out, "--resume") == 0  # the rest is one part: after 10 committed
    assert not (tmp_path / "out.parquet.parts").exists()
    assert pq.read_table(out).to_pylist() == pq.read_table(whole).to_pylist()


def test_keyword_columns_equal_top_k_row_by_row_and_the_inferred_arrow_type():
    rng = np.random.default_rng(3)
    probs = rng.random((9, 6)).astype(np.float32)
    probs[1] = 0.25  # every class tied
    probs[2, [0, 3, 5]] = probs[2].max()  # ties at the top, broken by the lower index
    probs[3, [1, 4]] = np.float32(0.5)
    labels = ["yes", "no", "up", "down"]  # fewer labels than classes: the others are named by index
    processor = SpeechProcessor(input_name="waveform", output_name="probs", labels=labels)
    prepared = processor.prepare_batch([wav_bytes(keyword_audio("yes")[:9000 + i]) for i in range(9)],
                                       indices=list(range(9)))
    for k in (1, 3, 4):
        columns = processor.postprocess_columns({"probs": probs}, prepared, params={"k": k})
        rows = columns.rows()
        assert rows == processor.postprocess({"probs": probs}, prepared, params={"k": k})
        for row, p, want in zip(rows, probs, prepared):
            assert row["predictions"] == top_k(p, labels=labels, k=k)
            assert row["keyword"] == row["predictions"][0]["label"]
            assert row["audio"] == {"sample_rate": 16000, "channels": 1, "seconds": round(want.seconds, 3)}
        assert columns.arrow().equals(pa.array(rows))


def test_collate_takes_prepare_batch_rows_in_place_and_copies_anything_else():
    processor = SpeechProcessor(input_name="waveform", output_name="probs", labels=None)
    clips = [wav_bytes(keyword_audio(w)[:8000 + 50 * i]) for i, w in enumerate(("yes", "no", "go", "up"))]
    prepared = processor.prepare_batch(clips, indices=[0, 1, 2, 3])
    batch = processor.collate(prepared)["waveform"]
    assert np.shares_memory(batch, prepared[0].waveform) and batch.shape == (4, 16000)
    assert np.array_equal(batch, np.stack([processor.prepare(c, index=i).waveform for i, c in enumerate(clips)]))
    cases = [(prepared[1:3], True), (prepared[::-1], False), (prepared[::2], False), ([prepared[0]] * 2, False)]
    for picked, in_place in cases:  # only consecutive rows of one batch are taken as they are
        got = processor.collate(list(picked))["waveform"]
        assert np.array_equal(got, np.stack([p.waveform for p in picked]))
        assert np.shares_memory(got, batch) == in_place
    one = [processor.prepare(clips[0], index=0)]
    assert np.array_equal(processor.collate(one)["waveform"], one[0].waveform[None])


def test_folder_files_are_rglobs_files_sorted_by_path(tmp_path):
    root = tmp_path / "in"
    for rel in ("b/z.wav", "a-b.wav", "a/b.wav", "a/c/d.wav", ".hidden", "B.WAV", "a/c.wav/e.png", "x..Wave", "y."):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    os.symlink(root / "missing.wav", root / "dangling.wav")
    os.symlink(root / "a", root / "link-to-a")
    os.mkfifo(root / "pipe.wav")
    want = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    got = folder_files(root)
    assert got == want and [str(p) for p in got] == [str(p) for p in want]
    assert root / "dangling.wav" in got and root / "link-to-a" in got and root / "pipe.wav" not in got
    assert folder_suffixes(root) == {p.suffix.lower() for p in want} == {".wav", ".png", ".wave", ""}


def reference_seen_keys(seen: dict[int, set[int]]) -> tuple[list[int], dict[int, int], int]:
    """The (user, item) keys as round 3 built them, a Python int per pair."""
    users = {user: i for i, user in enumerate(seen)}
    stride = max((max(items) for items in seen.values() if items), default=-1) + 1
    return sorted(users[u] * stride + item for u, items in seen.items() for item in items if item >= 0), users, stride


@pytest.mark.parametrize("raw", [
    {"7": [3, 1, 3], "07": [2], "-4": [], "12": [-1, 5, 0], "3": [9, 9, 4]},  # a user twice, repeats, negatives
    {"1": [], "2": []},
    {"5": [-3]},
    {},
])
def test_seen_keys_are_round_3s(raw):
    keys, users, stride = _seen_keys(raw)
    want_keys, want_users, want_stride = reference_seen_keys({int(u): set(items) for u, items in raw.items()})
    assert keys.dtype == np.int64 and keys.tolist() == want_keys and users == want_users and stride == want_stride


def test_recommender_start_up_reads_the_zoos_seen_items_as_before(tiny_zoo):
    processor = RecommenderProcessor(model_dir=tiny_zoo / "recommender", input_name="u", item_output="i",
                                     score_output="s", top_k=50)
    raw = json.loads((tiny_zoo / "recommender" / "seen_items.json").read_text())
    seen = {int(u): set(items) for u, items in raw.items()}
    want_keys, want_users, want_stride = reference_seen_keys(seen)
    assert processor._seen_keys.tolist() == want_keys and processor._users == want_users
    assert processor._stride == want_stride and processor.seen == seen
    some = sorted(seen)[:3]
    assert [processor.prepare(u, index=0).known for u in [*some, -5, 10**12]] == [True] * 3 + [False] * 2


def test_a_windows_speech_batches_become_one_table_with_the_per_batch_rows():
    processor = SpeechProcessor(input_name="waveform", output_name="probs", labels=["yes", "no", "up"])
    rng = np.random.default_rng(5)

    def segment(first: int, n: int, *, k: int, bad: tuple[int, ...] = ()) -> ColumnSegment:
        items = [Item(first + i, f"f{first + i}.wav") for i in range(n)]
        errors = [f"bad {i}" if i in bad else None for i in range(n)]
        prepared = processor.prepare_batch([wav_bytes(keyword_audio("go")[:7000 + i]) for i in range(n - len(bad))],
                                           indices=list(range(n - len(bad))))
        probs = rng.random((n - len(bad), 5)).astype(np.float32)
        return ColumnSegment(items, errors, processor.postprocess_columns({"probs": probs}, prepared,
                                                                          params={"k": k}))

    segments = [segment(0, 4, k=2), segment(4, 3, k=2, bad=(1,)), segment(7, 2, k=2),
                [{"row": 9, "id": "f9.wav", "ok": False, "error": "not a WAV", "result": None}],
                segment(10, 3, k=2), segment(13, 2, k=3)]  # another k cannot share columns
    want = pa.concat_tables([dict_table(s) if isinstance(s, list) else s.table() for s in segments],
                            promote_options="permissive")
    got = Rows(segments).table()
    assert got.schema == want.schema and got.to_pylist() == want.to_pylist()
    assert [r["row"] for r in got.to_pylist()] == list(range(15))
    assert [r["ok"] for r in got.to_pylist()].count(False) == 2
    assert [len(s) for s in _joined(segments)] == [9, 1, 3, 2]  # the first three batches became one segment
