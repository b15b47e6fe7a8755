"""Virtualenvs some tests run code in (the KServe SDK, the edge runner), built once per machine.

Each lives in ``$XDG_CACHE_HOME/modelserve/test-venvs/<name>-<key>``, where ``key`` hashes everything that defines
it (interpreter, requirements, the import that proves it works): change any of them and the next run builds a new
one. A file lock per venv makes parallel runs wait for one build instead of racing; a venv whose build did not
finish (no ``.complete`` marker) or whose check import fails is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from models import cache_home

COMPLETE = ".complete"


class VenvBuildError(RuntimeError):
    """pip could not install the venv's requirements (e.g. no index and nothing in pip's cache)."""


def venv_root() -> Path:
    return cache_home() / "test-venvs"


def venv_key(*, requirements: Sequence[str], check: str) -> str:
    spec = {"python": sys.version, "base": sys._base_executable, "requirements": list(requirements), "check": check}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _works(python: Path, check: str) -> bool:
    return python.is_file() and subprocess.run([str(python), "-I", "-c", check], capture_output=True).returncode == 0


def cached_venv(name: str, *, requirements: Sequence[str], check: str, timeout: float = 600) -> Path:
    """The python of a venv holding exactly `requirements` (and what they pull in), built if not cached.

    `check` is code that must run in the venv (e.g. its imports). Raises VenvBuildError when pip fails.
    """
    root = venv_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{name}-{venv_key(requirements=requirements, check=check)}"
    python = folder / "bin" / "python"
    # NOTE: fcntl.flock (not a lock library): released by the kernel if a holder dies mid-build, no dependency.
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / COMPLETE).exists() and _works(python, check):
            return python
        print(f"building the {name} venv in {folder}", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
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
        (folder / COMPLETE).write_text(json.dumps({"requirements": list(requirements), "check": check}))
    return python
