"""OpenAPI request/response examples for the task endpoints (rendered by FastAPI's /docs page)."""

from __future__ import annotations

_ERRORS = {
    "400": {"description": "Bad input (not an image, truncated WAV, empty text at index i, bad k, ...)",
            "content": {"application/json": {"example": {"error": "text 1 is empty; expected non-empty text"}}}},
    "404": {"description": "Unknown model"},
    "413": {"description": "Body, image or audio too large",
            "content": {"application/json": {"example": {
                "error": "request body of 70000000 bytes exceeds the limit of 67108864 bytes"}}}},
    "415": {"description": "Wrong content type or file format",
            "content": {"application/json": {"example": {
                "error": "item 0: GIF images are not accepted; expected a PNG or JPEG image"}}}},
}

_JSON_EXAMPLES = {
    "image (cnn)": {"value": {"images": ["iVBORw0KGgoAAAANSUhEUgAA..."], "k": 3}},
    "text (transformer, transformer-classifier)": {"value": {"texts": ["Open a file and read it line by line."]}},
    "speech": {"value": {"audio": ["UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA="]}},
    "recommender": {"value": {"user_id": 42, "k": 10, "exclude_seen": True}},
}

PREDICT_DOC = {
    "description": (
        "One endpoint per model, answered by the same dynamic batcher and ONNX Runtime instances as "
        "`/v2/models/{name}/infer`.\n\n"
        "* **image** (cnn): PNG or JPEG, any size or mode, as multipart field `file` (repeatable) or JSON "
        "`{\"images\": [base64, ...]}`; returns the top `k` labels (default 3).\n"
        "* **text** (transformer): `{\"texts\": [...]}`; returns embeddings, or labels for a classifier; "
        "each text says whether it was `truncated` and its token counts.\n"
        "* **speech**: WAV (any rate, mono/stereo, 8/16/24/32-bit PCM or float) as multipart `file` or "
        "`{\"audio\": [base64, ...]}`; returns the keyword with probabilities.\n"
        "* **recommender**: `{\"user_id\": 42, \"k\": 10, \"exclude_seen\": true}`; unknown users get "
        "popular items flagged `\"fallback\": \"popular\"`.\n\n"
        "`k` and `exclude_seen` may also be query parameters."),
    "requestBody": {"required": True, "content": {
        "application/json": {"examples": _JSON_EXAMPLES},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "k": {"type": "integer", "default": 3}}}}}},
    "responses": {"200": {"description": "One result per item, in order", "content": {"application/json": {
        "example": {"model_name": "cnn", "task": "image-classification", "results": [
            {"predictions": [{"label": "7", "index": 7, "probability": 0.91}],
             "preprocessing": {"original_size": [64, 64], "inverted": False}}]}}}}, **_ERRORS},
}

V1_DOC = {
    "description": "KServe V1 protocol: `{\"instances\": [...]}` -> `{\"predictions\": [...]}`; instances are "
                   "base64 images/WAVs (or `{\"b64\": ...}`), texts, or user ids, as for `/predict`.",
    "requestBody": {"required": True, "content": {"application/json": {"examples": {
        "text": {"value": {"instances": ["Compress a folder into a zip archive."]}},
        "recommender": {"value": {"instances": [42, 7], "parameters": {"k": 5}}}}}}},
    "responses": {"200": {"description": "Predictions in order", "content": {"application/json": {
        "example": {"predictions": [{"user_id": 42, "items": [{"item_id": 246, "score": 0.93}], "returned": 1}]}}}},
        **_ERRORS},
}

MODELS_EXAMPLE = {"models": [{
    "name": "cnn", "task": "image-classification", "family": "cnn", "variant": "fp32", "parent": None,
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "labels": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    "variants": [{"name": "cnn", "variant": "fp32"}, {"name": "cnn-int8", "variant": "int8"}]}]}
