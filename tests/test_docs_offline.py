"""/docs works offline (Swagger UI from local assets), and its examples and responses are the server's own."""

from __future__ import annotations

import base64
import re

import pytest

from tests.inprocess import inprocess_server

# Which zoo models each task example of /v1/models/{name}/predict is for.
EXAMPLE_MODELS = {"image": ["cnn"], "text": ["transformer", "transformer-classifier"], "speech": ["speech"],
                  "recommender": ["recommender"]}


@pytest.fixture(scope="module")
async def served(tiny_zoo):
    async with inprocess_server(tiny_zoo) as (_server, client):
        yield client


async def test_docs_page_uses_only_local_assets(served):
    page = await served.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(urls) >= 2 and "http" not in page.text.split("<script>")[0]
    kinds = set()
    for url in urls:
        assert url.startswith("/"), f"/docs references a remote asset: {url}"
        asset = await served.get(url)
        assert asset.status_code == 200, url
        kinds.add(asset.headers["content-type"].split(";")[0])
    assert {"text/javascript", "text/css"} <= kinds or {"application/javascript", "text/css"} <= kinds
    assert (await served.get("/redoc")).status_code == 404  # the CDN-only ReDoc page is gone


async def test_openapi_lists_no_422(served):
    doc = (await served.get("/openapi.json")).json()
    codes = {(path, method, code) for path, ops in doc["paths"].items() for method, op in ops.items()
             for code in op.get("responses", {})}
    assert codes and not [c for c in codes if c[2] == "422"]
    assert "HTTPValidationError" not in doc.get("components", {}).get("schemas", {})
    predict = doc["paths"]["/v1/models/{name}/predict"]["post"]
    upload = predict["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"]
    assert upload == {**upload, "type": "string", "format": "binary"}
    # A bad request really is a 400, as documented, not FastAPI's 422.
    assert (await served.post("/v1/models/cnn/predict", json={"images": "nope"})).status_code == 400


async def test_every_documented_example_answers_200(served):
    doc = (await served.get("/openapi.json")).json()
    examples = doc["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]["application/json"]
    tried = 0
    for title, example in examples["examples"].items():
        for model in EXAMPLE_MODELS[title.split(" ")[0]]:
            r = await served.post(f"/v1/models/{model}/predict", json=example["value"])
            assert r.status_code == 200, (title, model, r.text)
            tried += 1
    assert tried == 5
    png = base64.b64decode(examples["examples"]["image (cnn: a drawn 7)"]["value"]["images"][0])
    r = await served.post("/v1/models/cnn/predict", files={"file": ("seven.png", png, "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["predictions"]
    v1 = doc["paths"]["/v1/models/{name}:predict"]["post"]["requestBody"]["content"]["application/json"]
    for title, example in v1["examples"].items():
        model = "transformer" if title == "text" else "recommender"
        assert (await served.post(f"/v1/models/{model}:predict", json=example["value"])).status_code == 200
    embeddings = doc["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["example"]
    r = await served.post("/v1/embeddings", json=embeddings)
    assert r.status_code == 200 and len(r.json()["data"]) == len(embeddings["input"])
