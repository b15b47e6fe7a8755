"""Writing a model into a repository atomically: `modelserve build` and `modelserve optimize` both publish here.

Everything is written to a hidden temporary folder first and renamed into place, so a server polling the
repository never sees a half-written model; an existing model of that name is replaced.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from service.modelrepo.card import CARD_KEYS, write_card
from service.modelrepo.config import parse_config_text
from service.modelrepo.layout import (
    CONFIG_FILENAME,
    DEFAULT_MODEL_FILENAME,
    LABELS_FILENAME,
    LAYOUT_FILES,
    check_model_name,
)
from service.modelrepo.sessions import create_session
from service.sequence_config import server_fed_names


def validate(*, name: str, onnx_path: Path, config_pbtxt: str, card: dict[str, Any], labels: list[str] | None) -> None:
    """Check that config, graph and card agree before anything is written; ValueError saying what differs."""
    check_model_name(name)
    config = parse_config_text(config_pbtxt, where=f"{name}/{CONFIG_FILENAME}")
    if config.name != name:
        raise ValueError(f"config.pbtxt names model {config.name!r}, expected {name!r}")
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise ValueError(f"model card for {name!r} lacks keys {missing}; required: {list(CARD_KEYS)}")
    session = create_session(onnx_path)
    fed_in, fed_out = server_fed_names(config)  # a sequence model's control and state tensors
    for kind, declared, actual in (
        ("input", [i.name for i in config.input] + sorted(fed_in), [i.name for i in session.get_inputs()]),
        ("output", [o.name for o in config.output] + sorted(fed_out), [o.name for o in session.get_outputs()]),
    ):
        if sorted(declared) != sorted(actual):
            raise ValueError(f"{name}: config.pbtxt {kind}s {declared} differ from the ONNX graph's {actual}")
    if any(o.label_filename for o in config.output) and not labels:
        raise ValueError(f"{name}: config.pbtxt references a label_filename but no labels were given")


def publish(*, repo_dir: Path, name: str, onnx_path: Path, config_pbtxt: str, card: dict[str, Any], card_md: str,
            labels: list[str] | None = None, assets: dict[str, Path] | None = None) -> Path:
    """Write model `name` (version 1) into the repository at `repo_dir` and return its folder."""
    repo_dir = Path(repo_dir)
    validate(name=name, onnx_path=Path(onnx_path), config_pbtxt=config_pbtxt, card=card, labels=labels)
    repo_dir.mkdir(parents=True, exist_ok=True)
    tmp = repo_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_model_dir(tmp, onnx_path=Path(onnx_path), config_pbtxt=config_pbtxt, card=card,
                         card_md=card_md, labels=labels, assets=assets or {})
        return _swap_into_place(tmp, repo_dir / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_model_dir(target: Path, *, onnx_path: Path, config_pbtxt: str, card: dict[str, Any], card_md: str,
                     labels: list[str] | None, assets: dict[str, Path]) -> None:
    (target / "1").mkdir(parents=True)
    shutil.copyfile(onnx_path, target / "1" / DEFAULT_MODEL_FILENAME)
    (target / CONFIG_FILENAME).write_text(config_pbtxt.rstrip() + "\n")
    write_card(target, card, markdown=card_md)
    if labels:
        (target / LABELS_FILENAME).write_text("\n".join(labels) + "\n")
    for asset_name, source in assets.items():
        if Path(asset_name).name != asset_name or asset_name in LAYOUT_FILES or asset_name.isdigit():
            raise ValueError(f"asset name {asset_name!r} must be a plain file name not used by the layout")
        shutil.copyfile(source, target / asset_name)


def _swap_into_place(tmp: Path, final: Path) -> Path:
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final
