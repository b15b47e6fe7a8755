"""Triton's load API overrides: a model config (JSON) that replaces config.pbtxt, and model files sent in the
load request (`file:<version>/<path>`).

As Triton does, file overrides are written into a temporary model folder of their own, never into the
repository; the repository removes that folder when the model is unloaded or loaded again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from service.errors import InvalidInput
from service.modelrepo.layout import check_model_name, contained

FILE_PREFIX = "file:"
NAME_MAX = 255  # bytes in one path component on Linux filesystems; longer would fail writing it


@dataclass(frozen=True)
class LoadOverride:
    """A parsed, checked override: the config to use and the files (path under the model folder -> bytes)."""

    config: mc.ModelConfig
    max_batch_size_given: bool
    files: dict[str, bytes] = field(default_factory=dict)


def _parse_config(name: str, text: object) -> tuple[mc.ModelConfig, bool]:
    if not isinstance(text, str):
        raise InvalidInput(f"failed to load '{name}': parameter 'config' must be a string holding the model "
                           f"config as JSON, got {type(text).__name__}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"failed to load '{name}': failed to parse the model config override: {exc}; expected "
                           "the model config as JSON (Triton's ModelConfig field names)") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"failed to load '{name}': the model config override must be a JSON object, "
                           f"got {type(doc).__name__}")
    config = mc.ModelConfig()
    try:
        json_format.ParseDict(doc, config)
    except json_format.ParseError as exc:
        raise InvalidInput(f"failed to load '{name}': failed to parse the model config override: {exc}") from None
    # NOTE: proto3 cannot tell "max_batch_size: 0" from absent, and the two mean different things.
    return config, "max_batch_size" in doc or "maxBatchSize" in doc


def _check_file_path(name: str, path: str) -> str:
    parts = PurePosixPath(path).parts
    # NOTE: "Invalid file path" is Triton's wording (its clients match it).
    if (len(parts) < 2 or not parts[0].isdigit() or not parts[0].isascii() or path.startswith("/")
            or any(p in ("..", ".") for p in parts) or "\\" in path or not path.isprintable()):
        raise InvalidInput(f"failed to load '{name}': Invalid file path: file override '{FILE_PREFIX}{path}' must "
                           f"name a file inside a version folder, as '{FILE_PREFIX}<version>/model.onnx'")
    too_long = [p for p in parts if len(p.encode()) > NAME_MAX]
    if too_long:
        raise InvalidInput(f"failed to load '{name}': Invalid file path: file override '{FILE_PREFIX}{path}' has a "
                           f"path component of {len(too_long[0].encode())} bytes; at most {NAME_MAX} are allowed")
    return path


def parse_override(name: str, *, config: object | None, files: dict[str, bytes]) -> LoadOverride | None:
    """The override a load request carries (None when it carries none); InvalidInput saying what was expected."""
    check_model_name(name)
    if config is None and not files:
        return None
    if config is None:
        raise InvalidInput(f"failed to load '{name}': file overrides ({', '.join(FILE_PREFIX + f for f in files)}) "
                           "need the model config override 'config' as well; Triton requires both")
    parsed, mbs_given = _parse_config(name, config)
    checked = {_check_file_path(name, p): data for p, data in files.items()}
    _check_no_file_holds_another(name, checked)
    return LoadOverride(parsed, mbs_given, checked)


def _check_no_file_holds_another(name: str, files: dict[str, bytes]) -> None:
    """Refuse `file:1/a` together with `file:1/a/b` (a file cannot also be a folder): was a 500 when written."""
    folders = {str(parent) for path in files for parent in PurePosixPath(path).parents}
    clash = sorted(path for path in files if str(PurePosixPath(path)) in folders)
    if clash:
        raise InvalidInput(f"failed to load '{name}': Invalid file path: file override '{FILE_PREFIX}{clash[0]}' is "
                           "also the folder of another file override; send each file once, at its own path")


def materialize(override: LoadOverride, *, name: str) -> Path:
    """Write the override's files into a new temporary folder; returns `<tmp>/<name>`, the model folder."""
    root = Path(tempfile.mkdtemp(prefix="modelserve-override-"))
    model_dir = root / check_model_name(name)
    try:
        for rel, data in override.files.items():
            target = contained(model_dir, rel, what="file override")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return model_dir


def discard(model_dir: Path | None) -> None:
    """Remove a folder `materialize` made (its temporary parent included)."""
    if model_dir is not None:
        shutil.rmtree(model_dir.parent, ignore_errors=True)
