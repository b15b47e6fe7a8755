"""Text over KServe V2: a BYTES `text` input is tokenized on the server exactly as /v1 does, over HTTP and gRPC,
with the real tritonclient against a real server on the tiny zoo's transformer models."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server

TEXTS = ["how do I open a file and read its lines", "sorting a list of dictionaries by a key",
         " ".join(["iterators generators and coroutines"] * 200)]  # longer than max_sequence_length


@pytest.fixture(scope="module")
def urls(tiny_zoo):
    grpc_port = free_port()
    with run_server(tiny_zoo, extra_args=["--grpc-port", str(grpc_port)]) as url:
        yield url, f"127.0.0.1:{grpc_port}"


def _v1(url: str, model: str) -> list[dict]:
    answer = httpx.post(f"http://{url}/v1/models/{model}/predict", json={"texts": TEXTS}, timeout=60)
    answer.raise_for_status()
    return answer.json()["results"]


def _text_input(module, texts: list[str]):
    inp = module.InferInput("text", [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return inp


def _infer_both(urls: tuple[str, str], model: str, output: str) -> list[np.ndarray]:
    http, grpc = httpclient.InferenceServerClient(urls[0]), grpcclient.InferenceServerClient(urls[1])
    try:
        return [http.infer(model, [_text_input(httpclient, TEXTS)]).as_numpy(output),
                grpc.infer(model, [_text_input(grpcclient, TEXTS)]).as_numpy(output)]
    finally:
        http.close()
        grpc.close()


def test_embeddings_match_v1(urls):
    reference = np.array([r["embedding"] for r in _v1(urls[0], "transformer")], np.float32)
    assert _v1(urls[0], "transformer")[2]["truncated"] is True  # the long text exercises truncation
    for got in _infer_both(urls, "transformer", "embedding"):
        assert got.shape == reference.shape
        np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_classifier_probabilities_match_v1(urls):
    results = _v1(urls[0], "transformer-classifier")
    meta = httpclient.InferenceServerClient(urls[0]).get_model_metadata("transformer-classifier")
    output = meta["outputs"][0]["name"]
    for got in _infer_both(urls, "transformer-classifier", output):
        for row, result in zip(got, results):
            for p in result["predictions"]:
                assert row[p["index"]] == pytest.approx(p["probability"], rel=1e-4, abs=1e-6)


def test_metadata_lists_text_as_the_alternative_input(urls):
    meta = httpclient.InferenceServerClient(urls[0]).get_model_metadata("transformer")
    assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "text"]
    assert meta["inputs"][2] == {"name": "text", "datatype": "BYTES", "shape": [-1, 1]}
    grpc_meta = grpcclient.InferenceServerClient(urls[1]).get_model_metadata("transformer", as_json=True)
    assert grpc_meta["inputs"][2]["name"] == "text" and grpc_meta["inputs"][2]["datatype"] == "BYTES"


def test_bad_text_requests_are_400_saying_what_was_expected(urls):
    client = httpclient.InferenceServerClient(urls[0])
    empty = _text_input(httpclient, ["fine", "   "])
    with pytest.raises(InferenceServerException, match="empty; expected non-empty text") as caught:
        client.infer("transformer", [empty])
    assert caught.value.status() == "400"
    ids = httpclient.InferInput("input_ids", [1, 2], "INT64")
    ids.set_data_from_numpy(np.ones((1, 2), np.int64))
    with pytest.raises(InferenceServerException, match="send either the BYTES input 'text' alone"):
        client.infer("transformer", [_text_input(httpclient, ["fine"]), ids])
    numbers = httpx.post(f"http://{urls[0]}/v2/models/transformer/infer", timeout=30, json={
        "inputs": [{"name": "text", "shape": [1, 1], "datatype": "INT64", "data": [7]}]})
    assert numbers.status_code == 400 and "expected BYTES" in numbers.json()["error"]
    # A model that did not opt in still says the input is unknown.
    other = httpx.post(f"http://{urls[0]}/v2/models/cnn/infer", timeout=30, json={
        "inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["hello"]}]})
    assert other.status_code == 400
