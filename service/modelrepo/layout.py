"""Where things live in a Triton-layout model repository, and which names may be used.

    <root>/<model>/config.pbtxt            optional (auto-completed from the graph when absent)
    <root>/<model>/<version>/model.onnx    numeric version folders
    <root>/<model>/labels.txt, metrics.json, MODEL_CARD.md, assets (tokenizer.json, ...)

Every path handed out here is resolved (symlinks followed) and checked to stay under the repository root, so
a model name, a label file or a `file:` override can never reach outside it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from service.errors import InvalidInput, ModelLoadError

CONFIG_FILENAME = "config.pbtxt"
DEFAULT_MODEL_FILENAME = "model.onnx"
CARD_FILENAME = "metrics.json"
CARD_MARKDOWN = "MODEL_CARD.md"
LABELS_FILENAME = "labels.txt"
# Files of a model folder that describe the model itself (everything else beside them is an asset).
LAYOUT_FILES = frozenset({CONFIG_FILENAME, CARD_FILENAME, CARD_MARKDOWN, LABELS_FILENAME})

# Triton's rule for model names: a single path component, printable, not "." or "..".
_BAD_NAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
MAX_NAME_LENGTH = 255


def check_model_name(name: object) -> str:
    """`name` if it is a valid model name; InvalidInput saying what a name may be otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("model name is empty; expected a non-empty folder name of the model repository")
    if name in (".", "..") or name.startswith(".") or _BAD_NAME_CHARS.search(name) or len(name) > MAX_NAME_LENGTH:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidInput(
            f"invalid model name {shown!r}: expected one folder name of the model repository (printable, no '/' "
            f"or '\\', not starting with '.', at most {MAX_NAME_LENGTH} characters)"
        )
    return name


def contained(root: Path, relative: str | Path, *, what: str) -> Path:
    """`root / relative`, resolved, refusing anything (absolute paths, '..', symlinks) that leaves `root`."""
    base = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise InvalidInput(f"{what} {str(relative)!r} must be a path relative to its model folder")
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise InvalidInput(f"{what} {str(relative)!r} points outside the model repository")
    return target


def model_dir(root: Path, name: str) -> Path:
    """The folder of model `name` under `root` (name checked, containment enforced)."""
    return contained(root, check_model_name(name), what="model")


def relative_to_root(root: Path, path: Path) -> str:
    """`path` as shown to clients: relative to the repository, never an absolute filesystem path."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def disk_versions(folder: Path) -> list[int]:
    """Numeric version folders of a model folder, ascending."""
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(p.name) for p in entries if p.is_dir() and p.name.isdigit() and p.name.isascii())


def latest_version(folder: Path) -> int:
    versions = disk_versions(folder)
    if not versions:
        raise ModelLoadError(f"model {folder.name!r}: no numeric version folder (e.g. {folder.name}/1/model.onnx)")
    return versions[-1]


def model_file(folder: Path, version: int, filename: str = DEFAULT_MODEL_FILENAME) -> Path:
    """`<model>/<version>/<filename>`, contained in the model folder."""
    return contained(folder, Path(str(version)) / filename, what="model file")


def is_model_folder(folder: Path) -> bool:
    return (folder.is_dir() and not folder.name.startswith(".")
            and ((folder / CONFIG_FILENAME).is_file() or bool(disk_versions(folder))))


def scan(root: Path) -> dict[str, Path]:
    """Model folders in the repository: those holding a config.pbtxt or a numeric version folder."""
    if not Path(root).is_dir():
        raise ModelLoadError(f"model repository {root} is not a directory")
    found = {}
    for d in sorted(Path(root).iterdir()):
        if is_model_folder(d):
            try:
                found[d.name] = model_dir(root, d.name)
            except InvalidInput:  # a folder whose name is not a valid model name is not a model
                continue
    return found


def fingerprint(folder: Path) -> tuple:
    """What poll mode compares: every file's relative path, size and modification time."""
    items = []
    for dirpath, _dirs, files in os.walk(folder):
        for f in sorted(files):
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except FileNotFoundError:  # removed while we looked; the next poll sees the new state
                continue
            items.append((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))
