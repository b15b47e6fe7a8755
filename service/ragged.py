"""Length-aware batching: requests of different sequence lengths stacked by padding, as a model declares it.

A text or audio model whose inputs vary along their first non-batch axis (tokens, samples) declares in its
config.pbtxt that the batcher may pad them, and with what:

    parameters { key: "ragged_batching" value: { string_value: "pad" } }
    parameters { key: "ragged_pad_values" value: { string_value: "input_ids:0,attention_mask:0" } }

Each named input is padded along axis 1 of the batched tensor (dims[0] of the config, which must be -1) to the
longest request of its batch with its pad value; the mask input is padded with 0, so the model ignores the
padding and each row's result equals the unpadded one. Outputs with a variable first dim (per-token outputs) are
cut back to each request's own length; fixed-shape outputs (pooled embeddings, logits) are returned as they are.
The batcher groups waiting requests of similar length (`AdmissionQueue.compatible(by_length=True)`, service/length_groups.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.errors import ModelLoadError
from service.modelrepo.config import ModelSpec

RAGGED_KEY = "ragged_batching"
PAD_VALUES_KEY = "ragged_pad_values"
AXIS = 1  # the batched tensor's first non-batch axis


@dataclass(frozen=True)
class RaggedPolicy:
    """Which inputs the batcher pads (name -> pad value) and which outputs it cuts back per request."""

    pad_values: dict[str, float]
    outputs: tuple[str, ...] = ()
    max_tokens: int = 0  # rows x padded length per batch, at most (settings.max_batch_tokens); 0: no bound

    def shape_key(self, inputs: dict[str, np.ndarray]) -> tuple:
        """What must match for two requests to stack: everything but the padded axis."""
        return tuple((n, a.shape[2:] if n in self.pad_values else a.shape[1:], a.dtype.str)
                     for n, a in inputs.items())

    def length(self, inputs: dict[str, np.ndarray]) -> int:
        return max((a.shape[AXIS] for n, a in inputs.items() if n in self.pad_values and a.ndim > AXIS), default=0)

    def concat(self, parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Stack requests along the batch axis, padding each named input to the longest of the batch."""
        feeds = {}
        for name in parts[0]:
            arrays = [p[name] for p in parts]
            if name in self.pad_values:
                longest = max(a.shape[AXIS] for a in arrays)
                arrays = [_pad(a, longest, self.pad_values[name]) for a in arrays]
            feeds[name] = np.concatenate(arrays, axis=0)
        return feeds

    def cut(self, outputs: dict[str, np.ndarray], *, length: int) -> dict[str, np.ndarray]:
        """One request's slice of per-token outputs, back to its own length."""
        return {n: (o[:, :length] if n in self.outputs and o.ndim > AXIS else o) for n, o in outputs.items()}


def _pad(arr: np.ndarray, length: int, value: float) -> np.ndarray:
    if arr.shape[AXIS] == length:
        return arr
    widths = [(0, 0)] * arr.ndim
    widths[AXIS] = (0, length - arr.shape[AXIS])
    return np.pad(arr, widths, constant_values=value)


def _param(spec: ModelSpec, key: str) -> str:
    p = spec.config.parameters.get(key)
    return p.string_value.strip() if p is not None else ""


def ragged_policy(spec: ModelSpec, *, max_tokens: int = 0) -> RaggedPolicy | None:
    """The model's declared length-aware batching, or None; ModelLoadError says what a bad declaration lacks."""
    mode = _param(spec, RAGGED_KEY)
    if not mode:
        return None
    where = f"model {spec.name!r}: parameter {RAGGED_KEY!r}"
    if mode != "pad":
        raise ModelLoadError(f"{where}: expected \"pad\", got {mode!r}")
    if spec.max_batch_size <= 0:
        raise ModelLoadError(f"{where} needs max_batch_size > 0 (padding stacks requests along the batch axis)")
    pads = {}
    for item in filter(None, (x.strip() for x in _param(spec, PAD_VALUES_KEY).split(","))):
        name, _, value = item.partition(":")
        tensor = spec.input(name.strip())
        try:
            pad = float(value)
        except ValueError:
            raise ModelLoadError(f"model {spec.name!r}: {PAD_VALUES_KEY} item {item!r}: expected NAME:NUMBER") from None
        if tensor is None or not tensor.dims or tensor.dims[0] != -1:
            raise ModelLoadError(f"model {spec.name!r}: {PAD_VALUES_KEY} names {name!r}, which is not an input "
                                 f"with a variable first dim (dims [-1, ...])")
        pads[name.strip()] = pad
    if not pads:
        raise ModelLoadError(f"{where} needs {PAD_VALUES_KEY!r}, e.g. \"input_ids:0,attention_mask:0\"")
    outputs = tuple(t.name for t in spec.outputs if t.dims and t.dims[0] == -1)
    return RaggedPolicy(pad_values=pads, outputs=outputs, max_tokens=max_tokens)
