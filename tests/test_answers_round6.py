"""Round 6: right answers for what users really send, checked from outside on the tiny zoo.

Images: a digit drawn on a transparent canvas (black ink was composited on black: a blank image), WebP, GIF,
BMP, TIFF and MPO files (refused before; the first frame of an animation is answered), an image too small to
hold a digit (answered with a guess before), a truncated WebP (a 500 before) and an iPhone HEIC (called "not an
image"). Audio: WAVs written to a pipe, whose sizes are placeholders (refused as truncated or empty before);
clipped recordings (their flat peaks redrawn, as the model never heard clipping).
Text: full-width Latin, ligatures and control characters between words (tokenized into other words before), a
lone surrogate (a 500 before). Each answered alike by the task route, `modelserve predict` and the edge bundle
(tests/three_paths.py) and, for text, the OpenAI and KServe V2 routes. docs/RELIABILITY.md "Answers, round 6"
has the default zoo's figures.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import replace

import numpy as np
import openai
import pytest
import soundfile as sf
import soxr
import tritonclient.http as httpclient
from PIL import Image

from service.offline import cli as offline_cli
from service.processing.image import ImageProcessor
from service.processing.logmel import log_mel
from service.processing.speech import SpeechProcessor
from tests.digit_photos import BASE, render
from tests.inprocess import inprocess_server
from tests.task_media import held_out_digits, images_json, keyword_audio, laid_pixels, post_task, wav_bytes
from tests.three_paths import assert_predict_and_edge_match_server, assert_three_paths_agree_on_wavs

PROCESSOR = ImageProcessor(input_name="image", output_name="probabilities", labels=None)
PNG = replace(BASE, fmt="PNG")


@pytest.fixture(scope="module")
def server(zoo_server):
    return zoo_server  # the session's shared zoo server: these tests only ask it


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


# --- images -----------------------------------------------------------------------------------------------------

TRANSPARENT = {
    "black ink on a transparent canvas": replace(PNG, mode="ink on transparent", ink=0, noise=0),
    "palette, entry 0 transparent": replace(PNG, mode="P on transparent", noise=0),
}


@pytest.mark.parametrize("case", sorted(TRANSPARENT))
def test_a_digit_on_a_transparent_canvas_is_read_as_shown(case):
    images8, _, _ = held_out_digits(12)
    drawn = laid_pixels([render(im, TRANSPARENT[case], seed=i) for i, im in enumerate(images8)])
    paper = laid_pixels([render(im, replace(PNG, noise=0), seed=i) for i, im in enumerate(images8)])
    # Before: dark ink composited on black, the file's colour under alpha 0: a blank image (all zeros).
    assert (drawn.reshape(len(drawn), -1).max(axis=1) > 0.5).all()
    assert np.abs(drawn - paper).mean() < 0.05, np.abs(drawn - paper).mean()


def test_opaque_and_mostly_opaque_rgba_read_as_their_pixels():
    images8, _, _ = held_out_digits(6)
    photos = [Image.open(io.BytesIO(render(im, PNG, seed=i))).convert("RGB") for i, im in enumerate(images8)]
    opaque = [_save(p.convert("RGBA"), "PNG") for p in photos]
    assert np.array_equal(laid_pixels(opaque), laid_pixels([_save(p, "PNG") for p in photos]))  # alpha 255: the same bits
    cornered = []
    for p in photos:  # a photo with transparent corners (rounded by an app) reads as paper there, not ink
        alpha = np.full((p.height, p.width), 255, np.uint8)
        alpha[:40, :40] = alpha[-40:, -40:] = 0
        rgba = p.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha))
        cornered.append(_save(rgba, "PNG"))
    assert np.abs(laid_pixels(cornered) - laid_pixels(opaque)).mean() < 0.02
    white = replace(PNG, mode="ink on transparent", ink=255, paper=0, noise=0)  # light ink: over black, as before
    drawn = laid_pixels([render(im, white, seed=i) for i, im in enumerate(images8)])
    assert np.abs(drawn - laid_pixels([render(im, replace(PNG, noise=0), seed=i) for i, im in enumerate(images8)])).mean() < 0.05


def _formats(image8: np.ndarray, other8: np.ndarray, *, seed: int) -> dict[str, bytes]:
    """The same photo as each newly accepted format; animations and MPO carry a second, different digit."""
    first = Image.open(io.BytesIO(render(image8, PNG, seed=seed))).convert("RGB")
    second = Image.open(io.BytesIO(render(other8, PNG, seed=seed))).convert("RGB")
    return {"png": _save(first, "PNG"),
            "bmp": _save(first, "BMP"),
            "tif": _save(Image.fromarray(np.asarray(first)), "TIFF", save_all=True,
                         append_images=[Image.fromarray(np.asarray(second))]),
            "gif": _save(first.convert("L"), "GIF", save_all=True, append_images=[second.convert("L")]),
            "webp": _save(first, "WEBP", lossless=True, save_all=True, append_images=[second]),
            "jpg": _save(first, "MPO", save_all=True, append_images=[second], quality=95)}


def test_webp_gif_bmp_tiff_and_mpo_are_answered_on_their_first_frame(server):
    images8, _, _ = held_out_digits(2)
    files = _formats(images8[0], images8[1], seed=0)
    resp = post_task(server, "/v1/models/cnn/predict", params={"k": 10}, json=images_json(list(files.values())))
    assert resp.status_code == 200, resp.text  # before: 415 "WEBP images are not accepted", ...
    probs = {name: {p["index"]: p["probability"] for p in r["predictions"]}
             for name, r in zip(files, resp.json()["results"])}
    for name in ("bmp", "tif", "gif", "webp"):  # lossless: the PNG's pixels, so its answer exactly
        assert probs[name] == pytest.approx(probs["png"], abs=1e-6), name
    assert np.abs(laid_pixels([files["jpg"]]) - laid_pixels([files["png"]])).mean() < 0.02  # the JPEG's first image


BAD = {
    "a 1x1 PNG": (_save(Image.new("L", (1, 1), 128), "PNG"), 400,
                  "1x1 pixels is too small to hold a digit; expected at least 8x8"),
    "a 7x30 JPEG": (_save(Image.new("RGB", (7, 30)), "JPEG"), 400, "7x30 pixels is too small"),
    "a truncated WebP": (_save(Image.new("RGB", (64, 64), "white"), "WEBP")[:40], 400, "truncated or corrupt"),
    "an iPhone HEIC": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64), 415, "HEIF/AVIF images are not accepted"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_images_that_hold_no_digit_are_a_clear_4xx_alone(server, case):
    data, status, words = BAD[case]
    good = render(held_out_digits(1)[0][0], PNG, seed=0)
    resp = post_task(server, "/v1/models/cnn/predict", json=images_json([data]))
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"] and "expected" in resp.json()["error"]
    mixed = post_task(server, "/v1/models/cnn:predict", json={"instances": [{"b64": base64.b64encode(good).decode()}]})
    assert mixed.status_code == 200  # other clients' requests are not disturbed


async def test_server_predict_and_edge_agree_on_the_new_formats(tiny_zoo, tmp_path):
    images8, _, _ = held_out_digits(3)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    files = list(_formats(images8[0], images8[1], seed=0).items())
    files += [("png", render(images8[2], TRANSPARENT["black ink on a transparent canvas"], seed=2)),
              ("jpg", render(images8[2], replace(BASE, exif_orientation=3), seed=2))]  # upside down
    for i, (suffix, data) in enumerate(files):
        paths.append(folder / f"{i}.{suffix}")  # `predict` reads a folder in name order: the server's order
        paths[-1].write_bytes(data)
    async with inprocess_server(tiny_zoo) as (_, client):
        resp = await client.post("/v1/models/cnn/predict", params={"k": 10},
                                 files=[("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths])
    assert resp.status_code == 200, resp.text
    await assert_predict_and_edge_match_server(tiny_zoo, tmp_path, model="cnn", folder=folder, paths=paths,
                                               flag="--image", k=10, server_results=resp.json()["results"])


# --- audio ------------------------------------------------------------------------------------------------------

def streamed(wav: bytes, *, placeholder: int) -> bytes:
    """`wav` as a program writing to a pipe leaves it: the RIFF and data sizes never filled in."""
    out = bytearray(wav)
    at = wav.index(b"data")
    out[4:8] = out[at + 4:at + 8] = struct.pack("<I", placeholder)
    return bytes(out)


def _streamed_clips() -> dict[str, bytes]:
    word = keyword_audio("yes")
    sized = {"pcm16": wav_bytes(word), "float": wav_bytes(word, rate=22050, subtype="FLOAT")}
    clips = dict(sized)
    for name, data in sized.items():
        clips[f"{name}, data size 0xFFFFFFFF (ffmpeg -f wav -)"] = streamed(data, placeholder=0xFFFFFFFF)
        clips[f"{name}, sizes 0"] = streamed(data, placeholder=0)
    return clips


def test_a_wav_written_to_a_pipe_is_answered_as_the_same_wav_with_its_sizes(server):
    clips = _streamed_clips()
    resp = post_task(server, "/v1/models/speech/predict", params={"k": 12},
                 json={"audio": [base64.b64encode(c).decode() for c in clips.values()]})
    assert resp.status_code == 200, resp.text  # before: 400 "truncated WAV" / "WAV file has no samples"
    results = dict(zip(clips, resp.json()["results"]))
    for name, result in results.items():
        base = results[name.split(",")[0]]
        assert result["predictions"] == base["predictions"], name
        assert result["audio"] == base["audio"], name
    cut = wav_bytes(keyword_audio("yes"))[:3000]  # a WAV whose sizes were filled in and then cut short
    resp = post_task(server, "/v1/models/speech/predict", json={"audio": [base64.b64encode(cut).decode()]})
    assert resp.status_code == 400 and "truncated WAV" in resp.json()["error"]
    header_only = streamed(wav_bytes(np.zeros(0, np.float32)), placeholder=0xFFFFFFFF)
    resp = post_task(server, "/v1/models/speech/predict", json={"audio": [base64.b64encode(header_only).decode()]})
    assert resp.status_code == 400 and "expected a WAV file" in resp.json()["error"], resp.text


def _log_mel_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(log_mel(a[None]) - log_mel(b[None])).mean())


def test_clipped_speech_is_redrawn_towards_the_unclipped_word():
    processor = SpeechProcessor(input_name="waveform", output_name="probabilities", labels=None)
    distances = []
    for word in ("yes", "stop", "left", "go"):
        clean = keyword_audio(word)
        reference = clean * np.float32(0.9 / np.abs(clean).max())  # the level the model was trained at
        for gain, rate, subtype in ((8, 16000, "PCM_16"), (2, 16000, "PCM_16"), (4, 48000, "PCM_24")):
            loud = soxr.resample(clean * gain, 16000, rate) if rate != 16000 else clean * gain
            buf = io.BytesIO()  # clipped where it was recorded, at the file's own rate
            sf.write(buf, np.clip(loud, -1, 1), rate, subtype=subtype, format="WAV")
            clipped = np.clip(clean * gain, -1, 1)
            got = processor.prepare(buf.getvalue(), index=0).waveform
            distances.append((_log_mel_distance(got, reference), _log_mel_distance(clipped, reference)))
    now, before = np.array(distances).T  # before: the clipped samples as they were
    # "go" x2 hardly clips: unchanged but for float rounding (1e-4 allowed)
    assert (now <= before + 1e-4).all() and now.mean() < 0.6 * before.mean(), distances
    for quiet in (keyword_audio("yes"), (0.6 * np.sin(2 * np.pi * 50 * np.arange(16000) / 16000)).astype(np.float32)):
        wav = wav_bytes(quiet)  # unclipped (a word, a loud 50 Hz hum): exactly the samples that were sent
        expected = np.frombuffer(wav[44:], "<i2").astype(np.float32) / 32768
        np.testing.assert_array_equal(processor.prepare(wav, index=0).waveform, expected)


async def test_server_predict_and_edge_agree_on_streamed_and_clipped_wavs(tiny_zoo, tmp_path):
    clips = [*_streamed_clips().values(), wav_bytes(np.clip(keyword_audio("no") * 8, -1, 1)),
             wav_bytes(np.clip(keyword_audio("up") * 4, -1, 1), rate=44100, channels=2, subtype="PCM_24")]
    await assert_three_paths_agree_on_wavs(tiny_zoo, tmp_path, clips)


# --- text -------------------------------------------------------------------------------------------------------

PLAIN = ["Open the file and find the first line.", "Flush the buffer, then close the socket."]
FORMS = {
    "full-width Latin (CJK keyboard)": lambda t: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in t),
    "ligatures (copied from a PDF)": lambda t: t.replace("fi", "\ufb01").replace("fl", "\ufb02"),
    "form feeds and vertical tabs between words": lambda t: t.replace(" ", "\x0c", 2).replace(" ", "\x0b", 1),
    "NUL and DEL between words": lambda t: t.replace(" ", "\x00", 1).replace(" ", "\x7f", 1),
}


def _embeddings_everywhere(server: str, texts: list[str]) -> list[np.ndarray]:
    """The texts' embeddings from /v1, the OpenAI route (the `openai` client) and V2 `text` (tritonclient)."""
    v1 = post_task(server, "/v1/models/transformer/predict", json={"texts": texts})
    assert v1.status_code == 200, v1.text
    client = openai.OpenAI(base_url=f"http://{server}/v1", api_key="unused", max_retries=0)
    rows = client.embeddings.create(model="transformer", input=texts, encoding_format="float").data
    text = httpclient.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    v2 = httpclient.InferenceServerClient(server).infer("transformer", [text]).as_numpy("embedding")
    return [np.array([r["embedding"] for r in v1.json()["results"]]), np.array([d.embedding for d in rows]), v2]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_text_in_the_forms_users_paste_reads_as_the_plain_text_on_every_route(server, form):
    varied = [FORMS[form](t) for t in PLAIN]
    assert varied != PLAIN
    (plain, *_) = _embeddings_everywhere(server, PLAIN)
    for got in _embeddings_everywhere(server, varied):  # before: [UNK]s, words split or glued together
        np.testing.assert_allclose(got, plain, atol=1e-5)
    labelled = [post_task(server, "/v1/models/transformer-classifier/predict", json={"texts": texts, "k": 3}).json()
                for texts in (PLAIN, varied)]
    assert labelled[0]["results"] == labelled[1]["results"]


def test_a_lone_surrogate_is_refused_saying_what_is_expected_by_server_and_predict(server, tiny_zoo, tmp_path):
    body = '{"texts": ["fine", "cut in half: \\ud83d"]}'  # an emoji's first half, as JSON can carry it
    resp = post_task(server, "/v1/models/transformer/predict", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"], resp.text  # the server's parser
    texts = tmp_path / "texts.jsonl"  # `predict` reads JSONL with Python's json, which lets it through
    texts.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "cut in half: \\ud83d"}\n')
    out = tmp_path / "out.jsonl"
    assert offline_cli.main(["--model", "transformer", "--input", str(texts), "--output", str(out),
                             "--model-repository", str(tiny_zoo)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["ok"] and not rows[1]["ok"]
    # Before: "TypeError: TextInputSequence must be str".
    assert rows[1]["error"] == "text 1 holds a lone UTF-16 surrogate (an emoji cut in half?); expected valid Unicode text"
