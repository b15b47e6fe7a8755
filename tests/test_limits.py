"""Resource bounds per request, against the real server in a subprocess, with its peak RSS read from /proc.

Each hostile request (the ones that used to take gigabytes or seconds) must now get a 4xx naming the limit
and its setting, and leave the server's peak RSS (VmHWM) under a generous ceiling.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import run_server
from tests.limit_payloads import b64, png_header, wav

MB = 1024 * 1024
# Far below what the unbounded server reached (1 GB for 64 long texts, 8-12 GB for one 60 MB text,
# 0.9 GB for one odd-rate WAV), far above what a bounded request costs.
RSS_CEILING = 400 * MB


def _server_pid(port: str) -> int:
    """The `modelserve serve` process listening on `port` (found by its command line)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"--http-port" in argv and port.encode() in argv:
            return int(proc.name)
    raise AssertionError(f"no server process on port {port}")


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


@pytest.fixture(scope="module")
def server(tiny_zoo):
    with run_server(tiny_zoo, extra_args=["--model-control-mode", "explicit", "--load-model", "*"],
                    env={"MODELSERVE_MAX_TASK_ITEMS": "64"}) as url:
        pid = _server_pid(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=f"http://{url}", timeout=120) as client:
            yield client, pid


def _post(server, path: str, *, growth: int = RSS_CEILING, **kwargs) -> httpx.Response:
    """POST and check the server's peak RSS grew by less than `growth` over its RSS before the request."""
    client, pid = server
    before = _kib(pid, "VmRSS")
    resp = client.post(path, **kwargs)
    peak = _kib(pid, "VmHWM")
    assert peak - before < growth, f"peak RSS grew by {(peak - before) / MB:.0f} MB on {path}"
    return resp


def _error(resp: httpx.Response, status: int, *words: str) -> str:
    assert resp.status_code == status, resp.text
    message = resp.json()["error"]
    for w in words:
        assert w in message, message
    return message


def test_long_texts_are_tokenized_once_and_truncated(server):
    texts = [("lorem ipsum dolor sit amet " * 2300)[:60_000] for _ in range(64)]
    resp = _post(server, "/v1/models/transformer/predict", json={"texts": texts})
    assert resp.status_code == 200, resp.text
    first = resp.json()["results"][0]
    assert first["truncated"] is True and first["tokens_used"] == 256 and first["tokens"] > 10_000


def test_text_over_max_text_bytes_is_413_before_tokenizing(server):
    resp = _post(server, "/v1/models/transformer/predict", json={"texts": ["word " * 12_000_000]})
    _error(resp, 413, "max_text_bytes", "MODELSERVE_MAX_TEXT_BYTES")


def test_items_over_max_task_items_is_413(server):
    resp = _post(server, "/v1/models/transformer/predict", json={"texts": ["hi"] * 65})
    _error(resp, 413, "65 items", "max_task_items")


def test_decompression_bomb_png_is_413(server):
    resp = _post(server, "/v1/models/cnn/predict", json={"images": [b64(png_header(30_000, 30_000))]})
    _error(resp, 413, "item 0", "pixels")


def test_image_over_max_image_pixels_is_413_from_its_header(server):
    resp = _post(server, "/v1/models/cnn/predict", json={"images": [b64(png_header(5000, 4000))]})
    _error(resp, 413, "5000x4000", "max_image_pixels")


def test_images_over_max_request_pixels_together_is_413(server):
    images = [b64(png_header(2000, 1900))] * 17  # 3.8 Mpx each: under the per-image limit, 64.6 Mpx together
    resp = _post(server, "/v1/models/cnn/predict", json={"images": images})
    _error(resp, 413, "max_request_pixels")


@pytest.mark.parametrize("rate", [999_983, 2**31 - 1, 4_000])
def test_wav_sample_rate_outside_the_range_is_400_before_decoding(server, rate):
    resp = _post(server, "/v1/models/speech/predict", json={"audio": [b64(wav(rate=rate, frames=16_000))]})
    _error(resp, 400, f"{rate} Hz", "8000-192000", "min_sample_rate")


def test_wav_longer_than_max_audio_seconds_is_413(server):
    resp = _post(server, "/v1/models/speech/predict",
                 json={"audio": [b64(wav(rate=8000, frames=8000 * 61, sample_bytes=1))]})
    _error(resp, 413, "61.0 s", "max_audio_seconds")


def test_clips_over_max_request_audio_seconds_together_is_413(server):
    clip = b64(wav(rate=8000, frames=8000 * 59, sample_bytes=1))
    resp = _post(server, "/v1/models/speech/predict", json={"audio": [clip] * 11})
    _error(resp, 413, "max_request_audio_seconds")


def test_wav_at_an_odd_rate_inside_the_range_stays_cheap(server):
    resp = _post(server, "/v1/models/speech/predict", json={"audio": [b64(wav(rate=191_999, frames=191_999))]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["audio"]["sample_rate"] == 191_999


def test_token_ids_past_the_vocabulary_and_too_long_sequences_are_400(server):
    def infer(ids: list[list[int]]) -> httpx.Response:
        shape = [len(ids), len(ids[0])]
        inputs = [{"name": n, "shape": shape, "datatype": "INT64", "data": d}
                  for n, d in (("input_ids", ids), ("attention_mask", [[1] * shape[1]] * shape[0]))]
        return _post(server, "/v2/models/transformer/infer", json={"inputs": inputs})

    _error(infer([[101, 40_000, 102]]), 400, "40000", "vocab_size 30522")
    _error(infer([[101] * 300]), 400, "300 tokens", "max_sequence_length 256")
