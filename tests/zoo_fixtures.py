"""Session fixtures: the tiny model zoo (built with ``models.build``, cached per machine and code) and a server on it."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from models.build import available_families
from models.common import FAMILIES
from tests.build_cache import cached_folder

REPO_ROOT = Path(__file__).resolve().parent.parent

# Model names each family publishes (fixed by models/CONTRACT.md).
FAMILY_MODELS = {
    "cnn": ["cnn"],
    "transformer": ["transformer", "transformer-classifier"],
    "speech": ["speech"],
    "recommender": ["recommender"],
}


def zoo_key(families: list[str]) -> str:
    """What a tiny zoo build depends on: the code it runs (models/, export/, service/), the families asked for,
    the interpreter and every installed package's version."""
    digest = hashlib.sha256()
    for top in ("models", "export", "service"):
        for path in sorted((REPO_ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(f"{path.relative_to(REPO_ROOT)}\0".encode() + path.read_bytes() + b"\0")
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())
    digest.update(json.dumps([sys.version, families, dists]).encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding every present family built with ``--profile tiny``: built once per machine
    and code (tests/build_cache.py, keyed by zoo_key), each session serving its own copy (tests publish into it)."""
    from models import build

    present = available_families()  # families whose module file exists (all four once landed)

    def build_zoo(folder: Path) -> None:
        repo = folder / "model_repository"
        argv = ["--profile", "tiny", "--model-repository", str(repo)]
        if present != list(FAMILIES):
            argv += ["--families", ",".join(present)]
        code = build.main(argv)
        summary = (repo / build.SUMMARY_FILE).read_text() if (repo / build.SUMMARY_FILE).exists() else "none"
        assert code == 0, f"tiny zoo build failed (exit {code}); summary: {summary}"

    cached = cached_folder("test-zoo", "tiny", key=zoo_key(present), build=build_zoo)
    repo = tmp_path_factory.mktemp("tiny_zoo") / "model_repository"
    shutil.copytree(cached / "model_repository", repo)
    return repo


@pytest.fixture(scope="session")
def zoo_server(tiny_zoo: Path) -> Iterator[str]:
    """"127.0.0.1:PORT" of one real server on the session zoo (default settings), shared by every module that
    only asks it questions: tests using it never load or unload models nor read statistics or metrics."""
    from tests.conftest import run_server

    with run_server(tiny_zoo) as url:
        yield url
