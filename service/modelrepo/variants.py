"""Which file an instance serves: a model's FP16 variant on a GPU, its own FP32 graph elsewhere.

`modelserve optimize --publish` writes FP16 variants as sibling models `<model>-fp16` (version 1, I/O kept
FP32, card `variant: fp16`, `parent: <model>`; see export/fp16.py and service/modelrepo/card.py). FP16 is a
GPU format: ONNX Runtime's CPU provider has few FP16 kernels and casts around the rest, so CPU instances
always serve the FP32 graph.
"""

from __future__ import annotations

from pathlib import Path

from service.errors import InvalidInput, ModelLoadError
from service.modelrepo.card import read_card, variant_name, variant_of
from service.modelrepo.config import read_config
from service.modelrepo.layout import DEFAULT_MODEL_FILENAME, model_file


def fp16_variant_file(model_dir: Path, *, name: str, version: int) -> Path | None:
    """`<repo>/<name>-fp16/<version>/<its model file>` when that sibling is `name`'s FP16 variant (by its
    card, or by its name when it has no card) and has this very version; else None."""
    sibling = Path(model_dir).parent / variant_name(name, "fp16")
    if not sibling.is_dir():
        return None
    parent, variant = variant_of(sibling.name, read_card(sibling))
    if variant != "fp16" or parent != name:
        return None
    try:
        config, _, _ = read_config(sibling)
        path = model_file(sibling, version, config.default_model_filename or DEFAULT_MODEL_FILENAME)
    except (ModelLoadError, InvalidInput):  # a broken variant never stops its parent from loading
        return None
    return path if path.is_file() else None


def instance_model_file(fp32: Path, *, fp16: Path | None, on_gpu: bool, prefer_fp16: bool) -> Path:
    """The file one instance loads: the FP16 variant only on a GPU provider and when the server allows it."""
    return fp16 if fp16 is not None and on_gpu and prefer_fp16 else fp32
