"""Triton's classification extension: an output asked for with `classification: k` comes back as the top-k
"value:index[:label]" strings of each batch row (labels from the output's label_filename)."""

from __future__ import annotations

import numpy as np

from service.errors import InvalidInput

# NOTE: Triton's limit and words (qa/L0_classification checks both); FP16 is ranked here too (Triton 2021 did).
MAX_CLASSIFICATION_ELEMENTS = 1_000_000
UNCLASSIFIABLE = frozenset({"BYTES", "BOOL", "BF16"})


def check_classifiable(datatype: str, *, output: str, model: str) -> None:
    """Refuse before compute what cannot be ranked, in Triton's words (it answers INVALID_ARG)."""
    if datatype in UNCLASSIFIABLE:
        raise InvalidInput(f"class result not available for output due to unsupported type '{datatype}': output "
                           f"{output!r} of model {model!r}; classification ranks numeric outputs only, ask for it "
                           "without 'classification'")


def classify(data: np.ndarray, *, k: int, labels: list[str] | None, batched: bool) -> np.ndarray:
    """Top-k "value:index[:label]" strings per batch row (shape [rows, k]; [k] when the model does not batch)."""
    rows = data.reshape(data.shape[0], -1) if batched else data.reshape(1, -1)
    if rows.shape[1] > MAX_CLASSIFICATION_ELEMENTS:
        raise InvalidInput(f"classification output tensor too large: {rows.shape[1]} elements per row; at most "
                           f"{MAX_CLASSIFICATION_ELEMENTS} can be ranked")
    k = min(k, rows.shape[1])
    idx = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for j, i in enumerate(idx[r]):
            label = f":{labels[i]}" if labels and i < len(labels) else ""
            out[r, j] = f"{rows[r, i]:f}:{i}{label}".encode()
    return out if batched else out.reshape(k)
