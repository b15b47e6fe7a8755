"""What a complete zoo holds, and how long building it takes (no heavy imports: export/ uses it too).

A family is complete when every model it publishes (models/CONTRACT.md) has its config, graph and model
card, and the card records the profile and seed asked for; ``modelserve build`` keeps complete
families and builds only the others, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.modelrepo.layout import CARD_FILENAME, CONFIG_FILENAME, model_file

FAMILY_MODELS: dict[str, tuple[str, ...]] = {
    "cnn": ("cnn",),
    "transformer": ("transformer", "transformer-classifier"),
    "speech": ("speech",),
    "recommender": ("recommender",),
}

# Models derived from a family's published model without training (cheap), so a zoo built before they
# existed gains them on the next `modelserve build` instead of retraining the family.
DERIVED_MODELS: dict[str, tuple[str, ...]] = {"speech": ("speech-stream",)}
# Families whose kept graph is re-exported without training when it predates the current export (module in
# models/ with ``refresh(repo_dir=...) -> names re-published``): speech's cheaper in-graph front end.
REEXPORTED: dict[str, str] = {"speech": "speech_refront"}

# Seconds per family on this project's 2-core machine, otherwise idle (docs/BENCHMARKS.md: default
# profile with an empty speech-synthesis cache; tiny profile measured with `modelserve build --profile
# tiny`). The build's ETA starts from these and rescales them by how fast the finished families went.
EXPECTED_SECONDS: dict[str, dict[str, float]] = {
    "default": {"cnn": 24.6, "transformer": 39.5, "speech": 144.2, "recommender": 4.4},
    "tiny": {"cnn": 5.5, "transformer": 9.4, "speech": 5.6, "recommender": 3.0},
}
# The same default build under load (load average 5-7, other training jobs) took 3.5x as long (749 s).
SHARED_MACHINE_FACTOR = 3.5


def _card(model_dir: Path) -> dict | None:
    try:
        card = json.loads((model_dir / CARD_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def family_complete(repo_dir: Path, family: str, *, profile: str, seed: int) -> bool:
    """Whether every model of ``family`` is published in ``repo_dir`` with this profile and seed."""
    for name in FAMILY_MODELS[family]:
        model_dir = Path(repo_dir) / name
        if not (model_dir / CONFIG_FILENAME).is_file() or not model_file(model_dir, 1).is_file():
            return False
        card = _card(model_dir)
        if card is None or card.get("family") != family or card.get("variant"):
            return False
        if card.get("profile") != profile or card.get("seed") != seed:
            return False
    return True
