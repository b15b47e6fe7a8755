"""The model card (`metrics.json` + `MODEL_CARD.md`) and what it says: family, variant, parent.

Variants are sibling models named `<parent>-<variant>` (`cnn-int8`, `transformer-student`, ...) or whose
card names a `parent`; the card wins over the name suffix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from service.modelrepo.layout import CARD_FILENAME, CARD_MARKDOWN

# Keys every metrics.json written by `modelserve build` carries (the contract in models/CONTRACT.md).
CARD_KEYS = (
    "family", "task", "data", "split", "parameters", "metrics", "parity",
    "input_spec", "build_seconds", "profile", "seed",
)
# Variants `modelserve optimize` publishes.
PUBLISHED_VARIANTS = ("int8", "fp16", "student", "student-int8")
VARIANT_SUFFIX = re.compile(r"^(?P<parent>.+)-(?P<variant>int8|int4|uint8|fp16|bf16|fp32|student-int8|student|"
                            r"quantized|distilled|pruned|qdq|dynamic|static)$")


def read_card(folder: Path) -> dict[str, Any]:
    """The model card of a model folder; {} when it has none or it is not a JSON object."""
    path = Path(folder) / CARD_FILENAME
    try:
        card = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        card = {}
    return card if isinstance(card, dict) else {}


def write_card(folder: Path, card: dict[str, Any], *, markdown: str) -> None:
    # NOTE: allow_nan=False: a NaN metric is a bug upstream and must not reach a model card.
    (Path(folder) / CARD_FILENAME).write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    (Path(folder) / CARD_MARKDOWN).write_text(markdown.rstrip() + "\n")


def variant_of(name: str, card: dict[str, Any]) -> tuple[str | None, str]:
    """(parent model or None, variant label)."""
    match = VARIANT_SUFFIX.match(name)
    parent = card.get("parent") or (match["parent"] if match else None)
    variant = card.get("variant") or (match["variant"] if match else "fp32")
    return (str(parent) if parent else None), str(variant)


def variant_name(parent: str, variant: str) -> str:
    if variant not in PUBLISHED_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(PUBLISHED_VARIANTS)}")
    return f"{parent}-{variant}"


# Which family a model without a card belongs to follows from its input names (models/CONTRACT.md).
FAMILY_BY_INPUTS = (("cnn", {"image"}), ("transformer", {"input_ids", "attention_mask"}),
                    ("speech", {"waveform"}), ("recommender", {"user_id"}))


def family_of(input_names: set[str], card: dict[str, Any]) -> str | None:
    """The card's `family`; else guessed from the input names (models built elsewhere may lack a card)."""
    if card.get("family"):
        return str(card["family"])
    return next((family for family, needed in FAMILY_BY_INPUTS if needed <= input_names), None)
