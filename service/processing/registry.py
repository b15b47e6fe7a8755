"""Which processor serves a model, decided from its model card's `family` (or its input names) and config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import InvalidInput, ModelLoadError, ServingError
from service.modelrepo.card import family_of, read_card, variant_of
from service.modelrepo.config import ModelSpec
from service.modelrepo.layout import contained
from service.processing.base import Limits, Processor
from service.processing.image import ImageProcessor
from service.processing.recommender import RecommenderProcessor
from service.processing.speech import SpeechProcessor
from service.processing.text import TextProcessor


def _param(spec: ModelSpec, key: str) -> str | None:
    p = spec.config.parameters.get(key)
    return p.string_value if p is not None and p.string_value else None


def _first_labelled(spec: ModelSpec) -> str:
    return next((o.name for o in spec.outputs if o.name in spec.labels), spec.outputs[0].name)


def int_param(spec: ModelSpec, key: str) -> int | None:
    """A positive integer config parameter (e.g. max_sequence_length, vocab_size), None when absent."""
    value = _param(spec, key)
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ModelLoadError(f"model {spec.name!r}: config parameter {key!r} must be a positive integer, "
                             f"got {value!r}")
    return int(value)


def _text(spec: ModelSpec, *, model_dir: Path, out: str, labels: list[str] | None) -> dict[str, Any]:
    tokenizer = _param(spec, "tokenizer") or "tokenizer.json"
    try:
        tok = contained(model_dir, tokenizer, what="tokenizer")
    except InvalidInput as exc:
        raise ModelLoadError(f"model {spec.name!r}: {exc.message}") from None
    if not tok.is_file():
        raise ModelLoadError(f"model {spec.name!r}: tokenizer {spec.name}/{tokenizer} not found")
    return {"tokenizer_path": tok, "max_length": int_param(spec, "max_sequence_length") or 256,
            "input_names": ["input_ids", "attention_mask"], "output_name": out, "labels": labels,
            "vocab_size": int_param(spec, "vocab_size")}


@dataclass(frozen=True)
class Recipe:
    """How to build a model's processor: its family, class and constructor arguments (paths into the model
    folder). The edge bundle (export/edge.py) ships the class's module and these arguments, so the device
    builds the very processor the server builds."""

    family: str
    processor: type
    kwargs: dict[str, Any]


def processor_recipe(spec: ModelSpec, *, model_dir: Path) -> Recipe:
    """The processor recipe of a model, or InvalidInput saying why it has no task endpoint."""
    if spec.config.HasField("sequence_batching"):  # e.g. speech-stream: its state lives in the sequence batcher
        raise InvalidInput(f"model {spec.name!r} is a sequence model and has no task endpoint; stream it over "
                           f"/v2/models/{spec.name}/infer with the sequence_id, sequence_start and sequence_end "
                           "parameters")
    card = read_card(model_dir)
    family = family_of({t.name for t in spec.inputs}, card)
    out = _first_labelled(spec)
    labels = spec.labels.get(out)
    inputs = [t.name for t in spec.inputs]
    if family == "cnn":
        return Recipe(family, ImageProcessor, {"input_name": inputs[0], "output_name": out, "labels": labels})
    if family == "transformer":
        return Recipe(family, TextProcessor, _text(spec, model_dir=model_dir, out=out, labels=labels))
    if family == "speech":
        spec_in = card["input_spec"] if isinstance(card.get("input_spec"), dict) else {}
        return Recipe(family, SpeechProcessor, {"input_name": inputs[0], "output_name": out, "labels": labels,
                                                "trained_samples": int(spec_in.get("trained_samples", 16000))})
    if family == "recommender":
        names = [o.name for o in spec.outputs]
        width = spec.outputs[0].dims[-1] if spec.outputs[0].dims else 50
        return Recipe(family, RecommenderProcessor, {
            "model_dir": model_dir, "input_name": inputs[0], "item_output": names[0],
            "score_output": names[1] if len(names) > 1 else names[0], "top_k": int(width)})
    raise InvalidInput(f"model {spec.name!r} has no task endpoint (family {family!r}; task endpoints serve "
                       "cnn, transformer, speech and recommender models); use /v2/models/{name}/infer")


def build_processor(spec: ModelSpec, *, model_dir: Path, limits: Limits | None = None) -> Processor:
    """The task processor for a model (with the server's limits), or InvalidInput saying why it has none."""
    recipe = processor_recipe(spec, model_dir=model_dir)
    try:
        processor: Processor = recipe.processor(**recipe.kwargs, limits=limits or Limits())
    except ModelLoadError as exc:
        raise ModelLoadError(f"model {spec.name!r}: {exc.message}") from None
    except Exception as exc:  # e.g. the tokenizers library's own parse errors
        raise ModelLoadError(f"model {spec.name!r}: its processor could not be built "
                             f"({type(exc).__name__})") from None
    return processor


def _created(model_dir: Path) -> int:
    """When the model's folder was last written (Unix seconds; 0 where it cannot be read): OpenAI's `created`."""
    try:
        return int(model_dir.stat().st_mtime)
    except OSError:
        return 0


def describe_model(spec: ModelSpec | None, *, name: str, model_dir: Path,
                   processor: Processor | ServingError | None) -> dict:
    """The `GET /v1/models` entry of one model (spec None when it is not loaded)."""
    card = read_card(model_dir)
    parent, variant = variant_of(name, card)
    doc: dict = {"name": name, "variant": variant, "parent": parent, "family": card.get("family"),
                 "description": card.get("task"), "created": _created(model_dir)}
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
