"""`modelserve predict` on real files: local and Ray engines, bad rows, interruption and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from service.offline.cli import main
from tests.conftest import REPO_ROOT, wait_until
from tests.task_media import held_out_digits, keyword_audio, write_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("batch-inputs"))


def predict(tiny_zoo, model: str, src, out, *extra: str) -> int:
    return main(["--model", model, "--input", str(src), "--output", str(out),
                 "--model-repository", str(tiny_zoo), "--batch-size", "4", *extra])


def read(path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return pq.read_table(path).to_pylist()


def test_image_folder_with_a_bad_file(tiny_zoo, inputs, tmp_path):
    out = tmp_path / "digits.parquet"
    assert predict(tiny_zoo, "cnn", inputs["images"], out, "--k", "10") == 0
    rows = read(out)
    assert [r["row"] for r in rows] == list(range(13))
    assert rows[-1]["id"] == "zz-broken.png" and not rows[-1]["ok"] and "not an image" in rows[-1]["error"]
    assert not (tmp_path / "digits.parquet.parts").exists()
    _, _, laid_out = held_out_digits(12)
    reference = ort.InferenceSession(str(tiny_zoo / "cnn/1/model.onnx")).run(None, {"image": laid_out})[0]
    top1 = [r["result"]["predictions"][0]["index"] for r in rows[:12]]
    assert (np.array(top1) == reference.argmax(1)).mean() >= 0.75
    assert predict(tiny_zoo, "cnn", inputs["images"], out) == 2  # refuses to overwrite a finished output


def test_texts_jsonl_users_parquet_wavs_and_npy(tiny_zoo, inputs, tmp_path):
    assert predict(tiny_zoo, "transformer-classifier", inputs["texts"], tmp_path / "t.jsonl", "--k", "2") == 0
    texts = read(tmp_path / "t.jsonl")
    assert [r["id"] for r in texts] == ["t0", "t1", "t2", "t3", "empty"]
    assert all(r["ok"] for r in texts[:4]) and "text 4 is empty" in texts[4]["error"]
    assert len(texts[0]["result"]["predictions"]) == 2

    assert predict(tiny_zoo, "recommender", inputs["users"], tmp_path / "u.parquet", "--k", "5") == 0
    users = read(tmp_path / "u.parquet")
    assert [r["ok"] for r in users] == [True, True, True, False]
    assert users[2]["result"]["fallback"] == "popular"
    assert len(users[0]["result"]["items"]) == 5

    assert predict(tiny_zoo, "speech", inputs["wavs"], tmp_path / "w.parquet") == 0
    wavs = {r["id"]: r for r in read(tmp_path / "w.parquet")}
    assert "truncated WAV" in wavs["truncated.wav"]["error"]
    assert wavs["yes.wav"]["result"]["audio"] == {"sample_rate": 22050, "channels": 1, "seconds": 1.0}

    np.save(tmp_path / "waves.npy", np.stack([keyword_audio(w) for w in ("yes", "no")]))
    assert predict(tiny_zoo, "speech", tmp_path / "waves.npy", tmp_path / "n.parquet") == 0
    assert [r["id"] for r in read(tmp_path / "n.parquet")] == ["0", "1"]


def test_interrupted_run_resumes_without_losing_or_repeating_rows(tiny_zoo, tmp_path):
    n = 6000
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((n, 28, 28), dtype=np.float32))
    out = tmp_path / "x.parquet"
    cmd = [sys.executable, "-m", "service.cli", "predict", "--model", "cnn", "--input", str(tmp_path / "x.npy"),
           "--output", str(out), "--model-repository", str(tiny_zoo), "--batch-size", "50", "--part-rows", "200"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "x.parquet.parts" / "progress.json"
    wait_until(lambda: progress.exists() and json.loads(progress.read_text())["rows"] >= 400, timeout=60,
               what="two committed parts")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = json.loads(progress.read_text())["rows"]
    assert 0 < committed < n and not out.exists()
    # A part written just before the crash whose progress record never landed is rewritten, not duplicated.
    parts = progress.parent
    last = sorted(parts.glob("part-*.parquet"))[-1]
    os.link(last, parts / f"part-{int(last.stem.split('-')[1]) + 1:05d}.parquet")
    t0 = time.monotonic()
    assert subprocess.run([*cmd, "--resume"], cwd=REPO_ROOT, capture_output=True).returncode == 0
    assert time.monotonic() - t0 < 60
    rows = read(out)
    assert [r["row"] for r in rows] == list(range(n)) and all(r["ok"] for r in rows)
    assert not parts.exists()
    done = subprocess.run([*cmd, "--resume"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "rows ok: 0" in done.stderr and read(out) == rows  # nothing left to do
    assert f"skipped (already committed): {n}" in done.stderr


def test_resume_after_max_rows_and_refusals(tiny_zoo, inputs, tmp_path):
    out = tmp_path / "t.parquet"
    assert predict(tiny_zoo, "transformer", inputs["texts"], out, "--max-rows", "2", "--part-rows", "2") == 0
    assert not out.exists()
    assert predict(tiny_zoo, "transformer", inputs["texts"], out) == 2  # unfinished run needs --resume
    assert predict(tiny_zoo, "transformer", inputs["images"], out, "--resume") == 2  # another job's parts
    assert predict(tiny_zoo, "transformer", inputs["texts"], out, "--resume") == 0
    rows = read(out)
    assert [r["id"] for r in rows] == ["t0", "t1", "t2", "t3", "empty"]
    assert len(rows[0]["result"]["embedding"]) == 384


def test_ray_engine_matches_local(tiny_zoo, inputs, tmp_path):
    ray = pytest.importorskip("ray")
    local, remote = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert predict(tiny_zoo, "cnn", inputs["images"], local) == 0
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert predict(tiny_zoo, "cnn", inputs["images"], remote, "--engine", "ray", "--ray-actors", "1") == 0
    finally:
        ray.shutdown()
    a, b = read(local), read(remote)
    assert [r["id"] for r in a] == [r["id"] for r in b] and [r["error"] for r in a] == [r["error"] for r in b]
    for x, y in zip(a, b):
        if x["ok"]:
            px = [p["probability"] for p in x["result"]["predictions"]]
            py = [p["probability"] for p in y["result"]["predictions"]]
            assert np.allclose(px, py, atol=1e-5)


def test_every_file_gets_a_row_and_results_are_objects(tiny_zoo, inputs, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("digit-00.png", "digit-01.png"):
        (folder / name).write_bytes((inputs["images"] / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    out = tmp_path / "mixed.jsonl"
    assert predict(tiny_zoo, "cnn", folder, out) == 0
    rows = {r["id"]: r for r in read(out)}
    assert sorted(rows) == ["digit-00.png", "digit-01.png", "gone.png", "notes.txt"]
    assert rows["notes.txt"]["error"].startswith("notes.txt: skipped, not an image file (expected .png")
    assert "gone.png: cannot read the file" in rows["gone.png"]["error"] and not rows["gone.png"]["ok"]
    raw = json.loads(out.read_text().splitlines()[0])
    assert isinstance(raw["result"], dict) and raw["result"]["predictions"][0]["label"] in [str(d) for d in range(10)]

    capsys.readouterr()
    assert predict(tiny_zoo, "cnn", folder, out, "--resume") == 0
    assert "skipped (already committed): 4" in capsys.readouterr().err


def test_parquet_result_struct_round_trips(tiny_zoo, inputs, tmp_path):
    out = tmp_path / "u.parquet"
    # One row per part, so parts infer different struct types (with and without `fallback`, failed only).
    assert predict(tiny_zoo, "recommender", inputs["users"], out, "--k", "3", "--part-rows", "1") == 0
    table = pq.read_table(out)
    assert str(table.schema.field("result").type).startswith("struct<")
    rows = table.to_pylist()
    assert rows[2]["result"]["fallback"] == "popular" and rows[0]["result"]["fallback"] is None
    assert [i["item_id"] for i in rows[0]["result"]["items"]] and rows[3]["result"] is None


def test_wrong_input_kind_and_missing_model_say_what_to_do(tiny_zoo, inputs, tmp_path, capsys, monkeypatch):
    assert predict(tiny_zoo, "cnn", inputs["texts"], tmp_path / "x.jsonl") == 2
    assert "cnn takes images; this JSONL holds texts (field 'text')" in capsys.readouterr().err
    assert predict(tiny_zoo, "transformer", inputs["images"], tmp_path / "x.jsonl") == 2
    assert "transformer takes texts; this folder holds images (.png)" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl.parts").exists()

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODELSERVE_MODEL_REPOSITORY", raising=False)
    argv = ["--model", "cnn", "--input", str(inputs["images"]), "--output", str(tmp_path / "y.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "model_repository") in err and "does not exist" in err and "--model-repository" in err
    monkeypatch.setenv("MODELSERVE_MODEL_REPOSITORY", str(tiny_zoo))
    assert main([*argv[:1], "nope", *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert str(tiny_zoo) in err and "cnn, recommender, speech, speech-stream, transformer" in err
