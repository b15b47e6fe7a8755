"""What an input holds (images, WAV audio, texts, user ids, arrays), checked against the model's task up front.

Without this, a text JSONL sent to `cnn` failed on every row with an unhelpful TypeError; now the run stops
before any work with one line: "cnn takes images; this JSONL holds texts (field 'text')".
"""

from __future__ import annotations

import json
from pathlib import Path

from service.offline.arrow import parquet
from service.offline.readers import AUDIO_SUFFIXES, IMAGE_SUFFIXES, TEXT_FIELDS, folder_suffixes

# What each task's model takes, in words, and the input kinds it accepts ("files": path/b64 records, whose
# content is only known once decoded; "arrays": .npy rows).
TAKES = {"image-classification": "images", "keyword-spotting": "WAV audio", "text-embedding": "texts",
         "text-classification": "texts", "recommendation": "user ids"}
ACCEPTS = {"image-classification": {"images", "files", "arrays"}, "keyword-spotting": {"WAV audio", "files", "arrays"},
           "text-embedding": {"texts"}, "text-classification": {"texts"}, "recommendation": {"user ids"}}
FIELD_KINDS = {"text": "texts", "user_id": "user ids", "path": "files", "b64": "files"}


def _records_kind(fields: set[str], fmt: str) -> tuple[str, str] | None:
    for field in TEXT_FIELDS:  # the same precedence as readers._from_record
        if field in fields:
            return FIELD_KINDS[field], f"this {fmt} holds {FIELD_KINDS[field]} (field {field!r})"
    return None


def _first_record_fields(path: Path) -> set[str] | None:
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return None  # a bad line is that row's error, not the whole input's
                return set(record) if isinstance(record, dict) else None
    return None


def input_kind(path: Path) -> tuple[str, str] | None:
    """(kind, "this <format> holds <kind> (...)") of an input, or None when it cannot be told up front."""
    if path.is_dir():
        suffixes = folder_suffixes(path)
        if suffixes & set(IMAGE_SUFFIXES):
            return "images", f"this folder holds images ({'/'.join(sorted(suffixes & set(IMAGE_SUFFIXES)))})"
        if suffixes & set(AUDIO_SUFFIXES):
            return "WAV audio", "this folder holds WAV audio"
        return None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson") and path.is_file():
        fields = _first_record_fields(path)
        return _records_kind(fields, "JSONL") if fields is not None else None
    if suffix == ".parquet" and path.is_file():
        pq = parquet(f"Parquet input {path}")  # the optional `parquet` extra, loaded only for Parquet inputs
        return _records_kind(set(pq.read_schema(path).names), "Parquet file")
    if suffix == ".npy":
        return "arrays", "this .npy holds arrays"
    return None


def check_input(path: Path, *, model: str, task: str) -> None:
    """ValueError in one line when the input holds a kind of item the model does not take."""
    found = input_kind(path)
    if found is None or found[0] in ACCEPTS.get(task, {found[0]}):
        return
    raise ValueError(f"{model} takes {TAKES.get(task, task)}; {found[1]}")
