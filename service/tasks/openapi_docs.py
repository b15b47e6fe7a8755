"""OpenAPI request/response examples for the task endpoints (rendered by FastAPI's /docs page).

Every example is valid for the default zoo, so "Try it out" answers 200: the image and WAV examples are real
files (a drawn digit 7, a quarter second of silence) made here at import, small enough to show in the page.
"""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
from PIL import Image


def _digit_png() -> str:
    """A 28x28 white-on-black 7 (bar and diagonal stroke), PNG, base64."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:8, 6:22] = 255
    for row in range(8, 24):
        col = 21 - (row - 8) * 9 // 16
        pixels[row, col - 1:col + 2] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _silence_wav() -> str:
    """0.25 s of 8 kHz 8-bit mono silence (128 is 8-bit PCM's zero), WAV, base64."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes([128]) * 2000)
    return base64.b64encode(buf.getvalue()).decode("ascii")


DIGIT_PNG_B64 = _digit_png()
SILENCE_WAV_B64 = _silence_wav()

_ERRORS = {
    "400": {"description": "Bad input (not an image, truncated WAV, empty text at index i, bad k, ...)",
            "content": {"application/json": {"example": {"error": "text 1 is empty; expected non-empty text"}}}},
    "404": {"description": "Unknown model"},
    "503": {"description": "Model not ready, its queue is full (Retry-After), or timed out in the queue"},
    "413": {"description": "Body, image or audio too large",
            "content": {"application/json": {"example": {
                "error": "request body of 70000000 bytes exceeds the limit of 67108864 bytes"}}}},
    "415": {"description": "Wrong content type or file format",
            "content": {"application/json": {"example": {
                "error": "item 0: ICO images are not accepted; expected a PNG, JPEG, WebP, GIF, BMP or TIFF image"}}}},
}

_JSON_EXAMPLES = {
    "image (cnn: a drawn 7)": {"value": {"images": [DIGIT_PNG_B64], "k": 3}},
    "text (transformer, transformer-classifier)": {"value": {"texts": [
        "Compress data with gzip and write it to a zip archive.", "Return the square root of x."]}},
    "speech (a quarter second of silence)": {"value": {"audio": [SILENCE_WAV_B64]}},
    "recommender": {"value": {"user_id": 42, "k": 10, "exclude_seen": True}},
}

PREDICT_DOC = {
    "description": (
        "One endpoint per model, answered by the same dynamic batcher and ONNX Runtime instances as "
        "`/v2/models/{name}/infer`.\n\n"
        "* **image** (cnn): PNG, JPEG, WebP, GIF, BMP or TIFF (first frame), any size or mode, as multipart field `file` (repeatable) or JSON "
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
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary",
                     "description": "a PNG/JPEG image (cnn) or a WAV file (speech); repeat the field for more"},
            "k": {"type": "integer", "default": 3, "description": "labels returned per file"}}}}}},
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
    "variants": [{"name": "cnn", "variant": "fp32"}, {"name": "cnn-int8", "variant": "int8"}],
    "created": 1764547200}],
    "object": "list", "data": [{"id": "cnn", "object": "model", "created": 1764547200, "owned_by": "modelserve"}]}
