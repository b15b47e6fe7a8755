"""Hypothesis bodies for the task routes (`/v1/models/{name}/predict`, KServe V1 `:predict`, `/v1/embeddings`)
and their oracle: a 200, or a 4xx whose message says what was wrong; never a 5xx or a dropped connection; and a
text answers the same embedding on `/v1/embeddings` as on `/v1/models/{name}/predict`.

Items are real media where the task takes media (PNGs of random sizes and modes, WAVs of random rates, widths
and channel counts, written with Pillow and the `wave` module) or junk (random bytes, wrong JSON types).
"""

from __future__ import annotations

import base64
import io
import wave
from collections import Counter
from typing import Any

import httpx
import hypothesis
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
                    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids,
                                                                                       max_size=2)), max_leaves=6)


@st.composite
def png(draw: st.DrawFn) -> str:
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"]))
    pixels = draw(st.binary(min_size=w * h * len(mode), max_size=w * h * len(mode)))
    out = io.BytesIO()
    Image.frombytes(mode, (w, h), pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


@st.composite
def wav(draw: st.DrawFn) -> str:
    rate = draw(st.sampled_from([8000, 16000, 22050, 44100]))
    width, channels = draw(st.sampled_from([1, 2, 3, 4])), draw(st.integers(1, 2))
    frames = draw(st.integers(0, rate // 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(rng.integers(0, 256, frames * width * channels, dtype=np.uint8).tobytes())
    return base64.b64encode(out.getvalue()).decode()


ITEMS = {"image-classification": ("images", png()), "keyword-spotting": ("audio", wav()),
         "text-embedding": ("texts", st.text(max_size=40)), "text-classification": ("texts", st.text(max_size=40)),
         "recommendation": ("user_ids", st.integers(-5, 2**64))}
ITEM_JUNK = st.one_of(junk, st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()))


@st.composite
def task_request(draw: st.DrawFn, models: dict[str, str]) -> tuple[str, Any]:
    """(path, JSON body) for one of `models` (name -> task)."""
    name = draw(st.sampled_from(sorted(models)))
    task = models[name]
    key, item = ITEMS[task]
    hostile = draw(st.integers(0, 3)) == 0
    items = draw(st.lists(st.one_of(item, ITEM_JUNK) if hostile else item, min_size=0 if hostile else 1, max_size=4))
    if task == "text-embedding" and draw(st.integers(0, 2)) == 0:
        body: dict[str, Any] = {"model": name, "input": draw(st.one_of(st.just(items), st.text(max_size=20), junk))}
        for extra, value in (("encoding_format", st.sampled_from(["float", "base64", "int8", None])),
                             ("dimensions", st.one_of(st.integers(-1, 2000), junk))):
            if draw(st.booleans()):
                body[extra] = draw(value)
        return "/v1/embeddings", body
    body = {key: items} if not hostile or draw(st.booleans()) else draw(junk)
    if isinstance(body, dict) and (hostile or task == "recommendation") and draw(st.booleans()):
        body.update(draw(st.dictionaries(st.sampled_from(["k", "exclude_seen", "parameters", "top_k"]),
                                         st.one_of(st.integers(-3, 200), junk), max_size=2)))
    if draw(st.integers(0, 4)) == 0:
        return f"/v1/models/{name}:predict", {"instances": items}
    return f"/v1/models/{name}/predict", body


def error_message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
    except ValueError:
        return ""
    return err.get("message", "") if isinstance(err, dict) else (err if isinstance(err, str) else "")


def check_task(http: httpx.Client, path: str, body: Any, *, counts: Counter) -> list[str]:
    """The problems with one task request's answer (and, for a text embedding, its agreement with /predict)."""
    route = "/v1/embeddings" if path == "/v1/embeddings" else ("V1 :predict" if ":" in path else "/predict")
    try:
        resp = http.post(path, json=body, timeout=60)
    except httpx.HTTPError as exc:
        counts[f"task {route}:lost"] += 1
        return [f"{path}: lost ({type(exc).__name__})"]
    counts[f"task {route}:{resp.status_code}"] += 1
    if resp.status_code >= 500:
        return [f"{path}: {resp.status_code} {resp.text[:300]} for {str(body)[:200]}"]
    if resp.status_code != 200:
        return [] if error_message(resp).strip() else [f"{path}: {resp.status_code} without a message"]
    if path != "/v1/embeddings":
        return []
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    if body.get("encoding_format") == "base64":
        return []
    other = http.post(f"/v1/models/{body['model']}/predict", json={"texts": texts}, timeout=60)
    if other.status_code != 200:
        return [f"/v1/embeddings took {texts!r:.100} but /predict answered {other.status_code}"]
    got = [d["embedding"] for d in resp.json()["data"]]
    want = [r["embedding"] for r in other.json()["results"]]
    same = len(got) == len(want) and all(np.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want))
    return [] if same else [f"/v1/embeddings and /predict differ for {texts!r:.100}"]


def task_models(http: httpx.Client) -> dict[str, str]:
    """name -> task of every model a task route serves (GET /v1/models)."""
    return {m["name"]: m["task"] for m in http.get("/v1/models").json()["models"] if m.get("task") in ITEMS}


def fuzz_tasks(http: httpx.Client, models: dict[str, str], *, examples: int, seed: int | None,
               counts: Counter) -> list[str]:
    """Run `examples` task-route examples; every problem found."""
    found: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck))
    @given(request=task_request(models))
    def run(request: tuple[str, Any]) -> None:
        path, body = request
        found.extend(check_task(http, path, body, counts=counts))

    (hypothesis.seed(seed)(run) if seed is not None else run)()
    return found
