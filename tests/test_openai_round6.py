"""`/v1/embeddings` used as OpenAI's API is used: the real `openai` client (sync and AsyncOpenAI) against a real
server on the tiny zoo, compared with OpenAI's API reference and with this server's /predict and V2 answers."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient

from tests.conftest import run_server

TEXTS = ["Open a file and read it line by line.", "Compress a folder into a zip archive.", "Sort a list in place."]
# Above OpenAI's 2048 inputs, so that OpenAI's limit (not this setting) is the one met.
MAX_TASK_ITEMS = 4096


@pytest.fixture(scope="module")
def server(tiny_zoo):
    with run_server(tiny_zoo, env={"MODELSERVE_MAX_TASK_ITEMS": str(MAX_TASK_ITEMS)}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://{server}/v1", api_key="unused", max_retries=0)


def _async_client(server: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{server}/v1", api_key="unused", max_retries=0)


def _predict(server: str, texts: list[str]) -> list[dict]:
    r = httpx.post(f"http://{server}/v1/models/transformer/predict", json={"texts": texts}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _v2(server: str, texts: list[str]) -> np.ndarray:
    text = httpclient.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return httpclient.InferenceServerClient(server).infer("transformer", [text]).as_numpy("embedding")


def _rows(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], np.float32)


def test_every_input_form_equals_predict_and_v2_and_names_the_version_in_headers(server, client):
    expected = np.array([r["embedding"] for r in _predict(server, TEXTS)], np.float32)
    np.testing.assert_allclose(_v2(server, TEXTS), expected, atol=1e-5)
    width = expected.shape[1]

    # The client's default asks for base64 and decodes it: the same floats as encoding_format="float".
    floats = client.embeddings.create(model="transformer", input=TEXTS, encoding_format="float", dimensions=width,
                                      user="user-1")
    decoded = client.embeddings.create(model="transformer", input=TEXTS)
    np.testing.assert_array_equal(_rows(decoded), _rows(floats))
    np.testing.assert_allclose(_rows(floats), expected, atol=1e-5)
    single = client.embeddings.create(model="transformer", input=TEXTS[1], encoding_format="float")
    np.testing.assert_allclose(_rows(single)[0], expected[1], atol=1e-5)
    explicit = client.embeddings.create(model="transformer", input=TEXTS, encoding_format="base64")
    raw_rows = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in explicit.data]
    np.testing.assert_array_equal(np.array(raw_rows), _rows(floats))
    # Usage: the tokens the model read, as /predict counts them per text.
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(
        r["tokens_used"] for r in _predict(server, TEXTS))

    # Before: no header said which model version answered (only date, server, content-*).
    raw = client.embeddings.with_raw_response.create(model="transformer", input=TEXTS[0])
    assert raw.headers["openai-model"] == "transformer/1"
    assert int(raw.headers["openai-processing-ms"]) >= 0
    np.testing.assert_allclose(_rows(raw.parse())[0], expected[0], atol=1e-5)


def test_concurrent_async_batches_each_get_their_own_vectors(server):
    # LangChain-style: many batches of one corpus in flight at once through one AsyncOpenAI.
    texts = [f"document {i} about {topic}" for i, topic in enumerate(["files", "zip", "sockets", "json"] * 12)]
    reference = np.array([r["embedding"] for r in _predict(server, texts)], np.float32)
    batches = [texts[i:i + 5] for i in range(0, len(texts), 5)]

    async def embed_all():
        async with _async_client(server) as aclient:
            return await asyncio.gather(*(aclient.embeddings.with_raw_response.create(
                model="transformer", input=batch) for batch in batches))

    answers = asyncio.run(embed_all())
    for start, answer in zip(range(0, len(texts), 5), answers):
        assert answer.headers["openai-model"] == "transformer/1"
        rows = _rows(answer.parse())
        np.testing.assert_allclose(rows, reference[start:start + len(rows)], atol=1e-5)


def _max_length(server: str) -> int:
    (cut,) = _predict(server, ["word " * 5000])
    assert cut["truncated"]
    return cut["tokens_used"]


def test_an_input_longer_than_the_model_reads_is_400_not_truncated(server, client):
    limit = _max_length(server)
    fits = " ".join(["a"] * (limit - 2))  # [CLS] + limit - 2 tokens + [SEP]
    (at_limit,) = _predict(server, [fits])
    assert at_limit["tokens"] == limit and not at_limit["truncated"]
    whole = client.embeddings.create(model="transformer", input=fits, encoding_format="float")
    assert whole.usage.prompt_tokens == limit

    # Before: 200 with the embedding of the first `limit` tokens and usage `limit`, as if that were all of it.
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input=["short", fits + " a"])
    assert err.value.param == "input" and err.value.type == "invalid_request_error"
    assert f"input 1 has {limit + 1} tokens" in err.value.message and f"at most {limit} tokens" in err.value.message
    # Before: 413, which the client raises as a bare APIStatusError rather than BadRequestError.
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input="x" * 70_000)
    assert err.value.param == "input" and "UTF-8 bytes" in err.value.message


def test_input_counts_empty_inputs_and_unknown_arguments_are_400(server, client):
    assert len(client.embeddings.create(model="transformer", input=["a"] * 2048).data) == 2048
    # Before: 200 with 2049 vectors (this server's own limit is higher), where OpenAI answers 400.
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input=["a"] * 2049)
    assert err.value.param == "input" and "at most 2048" in err.value.message
    for empty, words in (("", "text 0 is empty"), (["fine", ""], "text 1 is empty"), ([], "non-empty list")):
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="transformer", input=empty)
        assert err.value.param == "input" and words in err.value.message
    # Before: `truncate` (another server's option) and a non-string `user` were ignored with a 200.
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input="hi", extra_body={"truncate": True})
    assert err.value.param == "truncate" and "unrecognized request argument 'truncate'" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="transformer", input="hi", user=7)  # type: ignore[arg-type]
    assert err.value.param == "user"
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="nope", input="hi")
    assert err.value.code == "model_not_found" and "'nope' is not found" in err.value.message


def test_token_id_arrays_are_refused_naming_the_langchain_setting(client):
    # LangChain's OpenAIEmbeddings sends tiktoken ids by default; this model would read them as its own.
    for ids in ([101, 7592, 102], [[101, 7592, 102], [101, 2088, 102]]):
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="transformer", input=ids)
        assert err.value.param == "input" and "check_embedding_ctx_length=False" in err.value.message


def test_models_list_and_retrieve_answer_openai_model_objects(server, client):
    # Before: list() was empty (no `data`) and retrieve() had id=None.
    listed = {m.id: m for m in client.models.list()}
    assert {"transformer", "transformer-classifier", "cnn"} <= set(listed)
    assert all(m.object == "model" and m.owned_by == "modelserve" and m.created > 0 for m in listed.values())
    one = client.models.retrieve("transformer")
    assert one.id == "transformer" and one.object == "model" and one.created == listed["transformer"].created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    kserve = httpx.get(f"http://{server}/v1/models", timeout=30).json()["models"]  # KServe's listing is kept
    assert {m["name"] for m in kserve} == set(listed)
