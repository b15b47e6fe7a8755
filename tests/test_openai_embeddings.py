"""`POST /v1/embeddings` with the official `openai` client against a real server on the tiny zoo."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

TEXTS = ["Open a file and read it line by line.", "Compress a folder into a zip archive."]


@pytest.fixture(scope="module")
def server(zoo_server):
    return zoo_server  # the session's shared zoo server: these tests only ask it


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://{server}/v1", api_key="unused", max_retries=0)


def _predict_embeddings(server: str, texts: list[str]) -> np.ndarray:
    r = httpx.post(f"http://{server}/v1/models/transformer/predict", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array([x["embedding"] for x in r.json()["results"]], np.float32)


def test_float_and_base64_match_the_predict_route(server, client):
    expected = _predict_embeddings(server, TEXTS)
    floats = client.embeddings.create(model="transformer", input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == "transformer"
    assert [d.index for d in floats.data] == [0, 1] and all(d.object == "embedding" for d in floats.data)
    assert np.allclose(np.array([d.embedding for d in floats.data]), expected, atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(TEXTS)

    # The client asks for base64 and decodes it itself when encoding_format is not given; ask explicitly too.
    implicit = client.embeddings.create(model="transformer", input=TEXTS)
    assert np.allclose(np.array([d.embedding for d in implicit.data]), expected, atol=1e-5)
    raw = httpx.post(f"http://{server}/v1/embeddings", timeout=60,
                     json={"model": "transformer", "input": TEXTS[0], "encoding_format": "base64"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (expected.shape[1],) and np.allclose(decoded, expected[0], atol=1e-5)


def test_single_string_and_matching_dimensions(server, client):
    width = _predict_embeddings(server, TEXTS[:1]).shape[1]
    one = client.embeddings.create(model="transformer", input=TEXTS[1], dimensions=width, encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == width


def test_errors_in_openai_shape(server, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input=TEXTS, dimensions=7)
    assert err.value.body["param"] == "dimensions" and "must be" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input=[[101, 2023, 102]])
    assert err.value.body["param"] == "input" and "token-id arrays" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer-classifier", input="hello")
    assert "not a text-embedding model" in err.value.body["message"] and "transformer" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="nope", input="hello")
    assert err.value.body["code"] == "model_not_found" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input=["fine", "  "])
    assert err.value.body["param"] == "input" and "empty" in err.value.body["message"]
    r = httpx.post(f"http://{server}/v1/embeddings", content=b"model=transformer", timeout=30,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "--json" in r.json()["error"]["message"]
