"""Text over KServe V2: a BYTES input of raw texts, tokenized on the server by the model's text processor.

A model opts in with a config parameter naming the input, as the transformer family's configs do:
`parameters { key: "text_input" value: { string_value: "text" } }`. A V2 request may then carry that BYTES
input (one UTF-8 text per row, shape [N, 1] or [N]) instead of the graph's `input_ids`/`attention_mask`; the
core tokenizes it exactly as `/v1/models/{name}/predict` does (same tokenizer.json, same truncation at
max_sequence_length, padded to the request's longest text) and runs the graph on the result.

Why a server-side pre-step and not ONNX Runtime Extensions' tokenizer operators in the graph: the graph and the
/v1 route then share one tokenizer implementation (service/processing/text.py), so V2 and /v1 cannot disagree
on truncation, and the exported graphs stay plain ONNX that every runtime (edge bundles included) can load.
"""

from __future__ import annotations

import numpy as np

from service.errors import InvalidInput
from service.modelrepo.config import ModelSpec
from service.processing.base import Processor

TEXT_INPUT_PARAMETER = "text_input"


def text_input_name(spec: ModelSpec) -> str | None:
    """The BYTES input this model accepts in place of its token tensors, or None when it does not opt in."""
    p = spec.config.parameters.get(TEXT_INPUT_PARAMETER)
    name = p.string_value if p is not None else ""
    return name if name and spec.input(name) is None else None


def text_metadata(spec: ModelSpec, name: str) -> dict:
    """The `text` input as model metadata lists it (after the graph's inputs, as the alternative to them)."""
    return {"name": name, "datatype": "BYTES", "shape": [-1, 1] if spec.max_batch_size > 0 else [1]}


def texts_of(name: str, array: np.ndarray) -> list[str]:
    """One text per row of a BYTES tensor; 400 saying what was expected otherwise."""
    arr = np.asarray(array)
    if arr.dtype != object and arr.dtype.kind not in "SU":
        raise InvalidInput(f"input {name!r}: expected BYTES (UTF-8 text, one per row), got {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidInput(f"input {name!r}: expected shape [-1, 1] (one text per row), got {list(arr.shape)}")
    texts = []
    for i, value in enumerate(arr.tolist()):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input {name!r} row {i}: expected UTF-8 text") from None
        if not isinstance(value, str):
            raise InvalidInput(f"input {name!r} row {i}: expected text, got {type(value).__name__}")
        texts.append(value)
    return texts


def tokenized(processor: Processor, *, name: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's feeds for a BYTES text tensor, prepared and collated as the task route does."""
    prepared = [processor.prepare(text, index=i) for i, text in enumerate(texts_of(name, array))]
    return processor.collate(prepared)
