"""What tests build once per machine and reuse: virtualenvs some tests run code in (the KServe SDK, the edge
runner) and the tiny model zoo.

Each lives in ``$XDG_CACHE_HOME/modelserve/<kind>/<name>-<key>``, where ``key`` hashes everything that defines it
(for a venv: interpreter, requirements, the import that proves it works): change any of them and the next run
builds a new one. A file lock per folder makes parallel runs wait for one build instead of racing; a folder whose
build did not finish (no ``.complete`` marker) or that fails its check is rebuilt; the three most recently used
folders of each name are kept, older ones deleted.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from models import cache_home

COMPLETE = ".complete"
KEEP = 3  # folders kept per name


class VenvBuildError(RuntimeError):
    """pip could not install the venv's requirements (e.g. no index and nothing in pip's cache)."""


def venv_key(*, requirements: Sequence[str], check: str) -> str:
    spec = {"python": sys.version, "base": sys._base_executable, "requirements": list(requirements), "check": check}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cached_folder(kind: str, name: str, *, key: str, build: Callable[[Path], None],
                  works: Callable[[Path], bool] = lambda folder: True) -> Path:
    """``$XDG_CACHE_HOME/modelserve/<kind>/<name>-<key>``, made by ``build(folder)`` unless a finished build is
    there and ``works(folder)``."""
    root = cache_home() / kind
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{name}-{key}"
    # NOTE: fcntl.flock (not a lock library): released by the kernel if a holder dies mid-build, no dependency.
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / COMPLETE).exists() and works(folder):
            (folder / COMPLETE).touch()  # its mtime says when it was last used (see _prune)
        else:
            print(f"building {kind}/{folder.name} in {root}", file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / COMPLETE).write_text(key)
    _prune(root, name)
    return folder


def _last_used(folder: Path) -> float:
    try:
        return (folder / COMPLETE).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _prune(root: Path, name: str) -> None:
    """Delete all but the KEEP most recently used folders of `name` (each code change makes a new zoo), never
    one used within the last hour nor one whose lock another run holds."""
    folders = sorted((p for p in root.glob(f"{name}-*") if p.is_dir()), key=_last_used, reverse=True)
    for old in folders[KEEP:]:
        if time.time() - _last_used(old) < 3600:
            continue
        with open(root / f"{old.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(old, ignore_errors=True)


def _works(python: Path, check: str) -> bool:
    return python.is_file() and subprocess.run([str(python), "-I", "-c", check], capture_output=True).returncode == 0


def cached_venv(name: str, *, requirements: Sequence[str], check: str, timeout: float = 600) -> Path:
    """The python of a venv holding exactly `requirements` (and what they pull in), built if not cached.

    `check` is code that must run in the venv (e.g. its imports). Raises VenvBuildError when pip fails.
    """
    def build(folder: Path) -> None:
        python = folder / "bin" / "python"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
        if requirements:
            # The outer pip installs into the venv: no pip inside it, and pip's local cache is shared.
            done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                                   "--disable-pip-version-check", *requirements],
                                  capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise VenvBuildError(f"pip install {' '.join(requirements)}: {done.stderr.strip()[-300:]}")
        if not _works(python, check):
            raise VenvBuildError(f"the {name} venv was built but `{check}` fails in it")

    folder = cached_folder("test-venvs", name, key=venv_key(requirements=requirements, check=check), build=build,
                           works=lambda folder: _works(folder / "bin" / "python", check))
    return folder / "bin" / "python"
