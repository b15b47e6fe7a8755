"""Which task a model serves, decided from its repository folder: metrics.json `family` and the config.

Also finds variants: sibling models named `<name>-int8`, `<name>-fp16`, `<name>-student`, ... or whose
metrics.json names a `parent`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.config import ModelSpec, build_spec, read_config
from service.errors import InvalidInput, ModelLoadError, ServingError
from service.tasks.base import Processor

VARIANT_SUFFIX = re.compile(r"^(?P<parent>.+)-(?P<variant>int8|int4|uint8|fp16|bf16|fp32|student|quantized|"
                            r"distilled|pruned|qdq|dynamic|static)$")


def read_card(model_dir: Path) -> dict:
    path = model_dir / "metrics.json"
    try:
        card = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        card = {}
    return card if isinstance(card, dict) else {}


def variant_of(name: str, card: dict) -> tuple[str | None, str]:
    """(parent model or None, variant label): the card wins over the name suffix."""
    match = VARIANT_SUFFIX.match(name)
    parent = card.get("parent") or (match["parent"] if match else None)
    variant = card.get("variant") or (match["variant"] if match else "fp32")
    return (str(parent) if parent else None), str(variant)


def family_of(spec: ModelSpec, card: dict) -> str | None:
    """metrics.json `family`; else guessed from the input names (models built elsewhere may lack a card)."""
    if card.get("family"):
        return str(card["family"])
    names = {t.name for t in spec.inputs}
    for family, needed in (("cnn", {"image"}), ("transformer", {"input_ids", "attention_mask"}),
                           ("speech", {"waveform"}), ("recommender", {"user_id"})):
        if needed <= names:
            return family
    return None


def _param(spec: ModelSpec, key: str) -> str | None:
    p = spec.config.parameters.get(key)
    return p.string_value if p is not None and p.string_value else None


def _first_labelled(spec: ModelSpec) -> str:
    return next((o.name for o in spec.outputs if o.name in spec.labels), spec.outputs[0].name)


def build_processor(spec: ModelSpec, *, model_dir: Path) -> Processor:
    """The task processor for a model, or InvalidInput saying why it has no task endpoint."""
    card = read_card(model_dir)
    family = family_of(spec, card)
    out = _first_labelled(spec)
    labels = spec.labels.get(out)
    inputs = [t.name for t in spec.inputs]
    if family == "cnn":
        from service.tasks.image import ImageProcessor

        return ImageProcessor(input_name=inputs[0], output_name=out, labels=labels)
    if family == "transformer":
        from service.tasks.text import TextProcessor

        tok = model_dir / (_param(spec, "tokenizer") or "tokenizer.json")
        if not tok.is_file():
            raise ModelLoadError(f"model {spec.name!r}: tokenizer {tok} not found")
        return TextProcessor(tokenizer_path=tok, max_length=int(_param(spec, "max_sequence_length") or 256),
                             input_names=["input_ids", "attention_mask"], output_name=out, labels=labels)
    if family == "speech":
        from service.tasks.speech import SpeechProcessor

        spec_in = card["input_spec"] if isinstance(card.get("input_spec"), dict) else {}
        return SpeechProcessor(input_name=inputs[0], output_name=out, labels=labels,
                               trained_samples=int(spec_in.get("trained_samples", 16000)))
    if family == "recommender":
        from service.tasks.recommender import RecommenderProcessor

        names = [o.name for o in spec.outputs]
        width = spec.outputs[0].dims[-1] if spec.outputs[0].dims else 50
        return RecommenderProcessor(model_dir=model_dir, input_name=inputs[0], item_output=names[0],
                                    score_output=names[1] if len(names) > 1 else names[0], top_k=int(width))
    raise InvalidInput(f"model {spec.name!r} has no task endpoint (family {family!r}; task endpoints serve "
                       "cnn, transformer, speech and recommender models); use /v2/models/{name}/infer")


def spec_from_dir(model_dir: Path) -> ModelSpec:
    """The model's spec from its config.pbtxt alone (batch jobs, which load no server)."""
    config, has_file, _ = read_config(model_dir)
    if not has_file or not config.input or not config.output:
        raise ModelLoadError(f"{model_dir}: needs a config.pbtxt listing inputs and outputs")
    if not config.name:
        config.name = model_dir.name
    return build_spec(config, model_dir=model_dir)


def describe_model(spec: ModelSpec | None, *, name: str, model_dir: Path,
                   processor: Processor | ServingError | None) -> dict:
    """The `GET /v1/models` entry of one model (spec None when it is not loaded)."""
    card = read_card(model_dir)
    parent, variant = variant_of(name, card)
    doc: dict = {"name": name, "variant": variant, "parent": parent, "family": card.get("family"),
                 "description": card.get("task")}
    if spec is None:
        return doc
    doc["inputs"] = [t.as_metadata(spec.max_batch_size) for t in spec.inputs]
    doc["outputs"] = [t.as_metadata(spec.max_batch_size) for t in spec.outputs]
    doc["labels"] = spec.labels.get(_first_labelled(spec))
    if isinstance(processor, ServingError):
        doc["task"], doc["task_error"] = None, processor.message
    elif processor is not None:
        doc["task"] = processor.task
        doc.update(processor.describe())
    return doc
