"""Task endpoints through the real Server in-process (ASGI): real PNG/JPEG digits, eSpeak WAVs, texts, user ids."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from tokenizers import Tokenizer

from tests.inprocess import inprocess_server
from tests.task_media import TEXTS, digit_file, held_out_digits, keyword_audio, wav_bytes

LIMIT = 3_000_000  # the server's max_request_bytes in this module, to test 413 cheaply


@pytest.fixture(scope="module")
def zoo(tiny_zoo, tmp_path_factory):
    """A copy of the tiny zoo plus a `cnn-int8` sibling (variant detected by its name suffix)."""
    repo = tmp_path_factory.mktemp("tasks") / "repo"
    shutil.copytree(tiny_zoo, repo)
    shutil.copytree(repo / "cnn", repo / "cnn-int8")
    cfg = repo / "cnn-int8" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "cnn"', 'name: "cnn-int8"'))
    return repo


@pytest.fixture(scope="module")
async def base(zoo):
    async with inprocess_server(zoo, max_request_bytes=LIMIT) as (_, client):
        yield client


def session(zoo, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(zoo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


async def test_models_list_tasks_labels_and_variants(base):
    models = {m["name"]: m for m in (await base.get("/v1/models")).json()["models"]}
    assert {n: m["task"] for n, m in models.items()} == {
        "cnn": "image-classification", "cnn-int8": "image-classification", "speech": "keyword-spotting",
        "transformer": "text-embedding", "transformer-classifier": "text-classification",
        "recommender": "recommendation", "speech-stream": None}  # a sequence model: /v2 infer only
    assert "sequence_id" in models["speech-stream"]["task_error"]
    assert {"name": "speech-stream", "variant": "stream"} in models["speech"]["variants"]
    assert models["cnn"]["labels"] == [str(d) for d in range(10)]
    assert models["cnn"]["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert models["cnn"]["variants"] == [{"name": "cnn", "variant": "fp32"}, {"name": "cnn-int8", "variant": "int8"}]
    assert models["cnn-int8"]["parent"] == "cnn"
    assert "20x20" in models["cnn"]["preprocessing"]
    assert models["speech"]["labels"][:2] == ["_silence_", "_unknown_"]
    one = (await base.get("/v1/models/recommender")).json()
    assert one["ready"] is True and one["task"] == "recommendation"
    assert (await base.get("/v1/models/nope")).status_code == 404


async def test_image_uploads_match_the_training_layout(base, zoo):
    images8, _, laid_out = held_out_digits(16)
    reference = session(zoo, "cnn").run(None, {"image": laid_out})[0]
    files = [("file", (f"{i}.png", digit_file(im), "image/png")) for i, im in enumerate(images8)]
    r = await base.post("/v1/models/cnn/predict", files=files, params={"k": 10})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 16
    got = np.zeros_like(reference)
    for row, res in enumerate(results):
        for p in res["predictions"]:
            got[row, p["index"]] = p["probability"]
    # 8x8 digits rendered at 64x64 and brought back to 20x20 are close to, not equal to, the training tensors;
    # uploads are centred by centre of mass (as MNIST), the training tensors by their box: a pixel's shift.
    assert np.abs(got - reference).max() < 0.15
    # NOTE: 0.7, not 0.8: the tiny zoo's cnn (~0.4 accuracy) flips labels on that shift (12/16 agree); real
    # photos are checked in tests/test_preprocessing_parity.py and measured with the default zoo (README).
    assert (got.argmax(1) == reference.argmax(1)).mean() >= 0.7


async def test_jpeg_dark_on_light_rgb_and_base64(base):
    images8, _, _ = held_out_digits(6)
    png = [base64.b64encode(digit_file(im)).decode() for im in images8]
    jpeg = [base64.b64encode(digit_file(im, fmt="JPEG", side=90, dark_on_light=True, mode="RGB")).decode()
            for im in images8]
    r1 = (await base.post("/v1/models/cnn/predict", json={"images": png, "k": 3})).json()["results"]
    r2 = (await base.post("/v1/models/cnn:predict", json={"instances": [{"b64": j} for j in jpeg]})).json()
    r2 = r2["predictions"]
    assert all(r["preprocessing"]["inverted"] for r in r2) and not any(r["preprocessing"]["inverted"] for r in r1)
    assert all(len(r["predictions"]) == 3 for r in r1)
    top1 = [(a["predictions"][0]["label"], b["predictions"][0]["label"]) for a, b in zip(r1, r2)]
    assert sum(a == b for a, b in top1) >= 5, top1


async def test_bad_image_uploads(base):
    ico = io.BytesIO()
    Image.new("L", (8, 8)).save(ico, "ICO")
    png = digit_file(held_out_digits(1)[0][0])
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, "PNG")
    cases = [
        ({"files": [("file", ("x.png", b"not an image at all", "image/png"))]}, 415, "PNG, JPEG"),
        ({"files": [("file", ("x.ico", ico.getvalue(), "image/x-icon"))]}, 415, "ICO images are not accepted"),
        ({"files": [("file", ("x.png", png[: len(png) // 2], "image/png"))]}, 400, "truncated"),
        ({"files": [("file", ("x.png", huge.getvalue(), "image/png"))]}, 413, "exceeds the limit"),
        ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "application/json"),
        ({"content": b"\0" * (LIMIT + 10), "headers": {"content-type": "application/json"}}, 413, "limit"),
        ({"json": {"images": ["%%%"]}}, 400, "base64"),
        ({"files": [("other", ("x.png", png, "image/png"))]}, 400, "field 'file'"),
    ]
    for kwargs, status, text in cases:
        r = await base.post("/v1/models/cnn/predict", **kwargs)
        assert r.status_code == status, (kwargs.keys(), r.text)
        assert text in r.json()["error"]


async def test_text_embeddings_padding_truncation_and_errors(base, zoo):
    long_text = "the quick brown fox jumps over the lazy dog " * 60
    r = await base.post("/v1/models/transformer/predict", json={"texts": [TEXTS[0], long_text, TEXTS[1]]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["truncated"] for x in res] == [False, True, False]
    assert res[1]["tokens_used"] == 256 and res[1]["tokens"] > 256
    # Padding inside the request must not change an embedding: compare with the text alone through ORT.
    tok = Tokenizer.from_file(str(zoo / "transformer" / "tokenizer.json"))
    ids = np.array([tok.encode(TEXTS[0]).ids], np.int64)
    alone = session(zoo, "transformer").run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
    got = np.array(res[0]["embedding"], np.float32)
    assert got.shape == (384,) and np.abs(got - alone).max() < 1e-4
    assert res[0]["tokens"] == ids.shape[1]
    bad = await base.post("/v1/models/transformer/predict", json={"texts": [TEXTS[0], "   "]})
    assert bad.status_code == 400 and "text 1 is empty" in bad.json()["error"]
    assert (await base.post("/v1/models/transformer/predict", json={"texts": []})).status_code == 400


async def test_text_classifier_labels_and_v1(base, zoo):
    labels = (zoo / "transformer-classifier" / "labels.txt").read_text().split()
    r = await base.post("/v1/models/transformer-classifier:predict",
                   json={"instances": TEXTS, "parameters": {"k": 4}})
    assert r.status_code == 200, r.text
    for item in r.json()["predictions"]:
        probs = [p["probability"] for p in item["predictions"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert all(p["label"] in labels for p in item["predictions"])


async def test_speech_any_wav_format(base, zoo):
    audio = keyword_audio("yes")
    reference = session(zoo, "speech").run(None, {"waveform": audio[None]})[0][0]
    formats = [{}, {"rate": 8000, "subtype": "PCM_U8"}, {"rate": 22050, "subtype": "PCM_24", "channels": 2},
               {"rate": 48000, "subtype": "PCM_32"}, {"rate": 44100, "subtype": "FLOAT", "channels": 2}]
    files = [("file", (f"{i}.wav", wav_bytes(audio, **f), "audio/wav")) for i, f in enumerate(formats)]
    r = await base.post("/v1/models/speech/predict", files=files, params={"k": 12})
    assert r.status_code == 200, r.text
    for fmt, res in zip(formats, r.json()["results"]):
        got = {p["index"]: p["probability"] for p in res["predictions"]}
        diff = max(abs(got[i] - float(reference[i])) for i in range(12))
        assert diff < 0.02, (fmt, diff)
        assert res["audio"]["sample_rate"] == fmt.get("rate", 16000)
        assert res["audio"]["channels"] == fmt.get("channels", 1)
        assert res["keyword"] == res["predictions"][0]["label"]


async def test_bad_wavs(base):
    good = wav_bytes(keyword_audio("go"))
    for body, status, text in [(good[:2000], 400, "truncated WAV"), (b"RIFF0000AVI junk", 415, "not a WAV"),
                               (digit_file(held_out_digits(1)[0][0]), 415, "not a WAV")]:
        r = await base.post("/v1/models/speech/predict", files=[("file", ("a.wav", body, "audio/wav"))])
        assert r.status_code == status and text in r.json()["error"], r.text


async def test_recommender_exclude_seen_and_fallback(base, zoo):
    seen = json.loads((zoo / "recommender" / "seen_items.json").read_text())
    popular = json.loads((zoo / "recommender" / "item_popularity.json").read_text())["items"]
    user = next(u for u, items in seen.items() if len(items) >= 5)
    r = await base.post("/v1/models/recommender/predict", json={"user_id": int(user), "k": 10, "exclude_seen": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert "fallback" not in res and 0 < res["returned"] <= 10
    assert not {i["item_id"] for i in res["items"]} & set(seen[user])
    scores = [i["score"] for i in res["items"]]
    assert scores == sorted(scores, reverse=True)
    with_seen = (await base.post("/v1/models/recommender/predict",
                           json={"user_id": int(user), "k": 50, "exclude_seen": False})).json()["results"][0]
    assert {i["item_id"] for i in with_seen["items"]} & set(seen[user])
    unknown = (await base.post("/v1/models/recommender:predict", json={"instances": [123456789],
                                                                         "parameters": {"k": 5}})).json()
    res = unknown["predictions"][0]
    assert res["fallback"] == "popular"
    assert [i["item_id"] for i in res["items"]] == popular[:5]
    for bad in ({"user_id": "alice"}, {"user_id": 1, "k": 0}, {"user_id": 1, "exclude_seen": "maybe"}):
        assert (await base.post("/v1/models/recommender/predict", json=bad)).status_code == 400


async def test_same_batcher_as_v2_and_openapi(base):
    async def count() -> int:
        stats = (await base.get("/v2/models/cnn/stats")).json()["model_stats"][0]
        return stats["inference_stats"]["success"]["count"]

    before = await count()
    png = base64.b64encode(digit_file(held_out_digits(1)[0][0])).decode()
    assert (await base.post("/v1/models/cnn/predict", json={"images": [png]})).status_code == 200
    assert await count() == before + 1
    schema = (await base.get("/openapi.json")).json()
    op = schema["paths"]["/v1/models/{name}/predict"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert "recommender" in op["requestBody"]["content"]["application/json"]["examples"]
    assert "/v1/models/{name}:predict" in schema["paths"] and "/v1/models" in schema["paths"]
    assert (await base.get("/docs")).status_code == 200
    assert (await base.post("/v1/models/nope/predict", json={})).status_code == 404
