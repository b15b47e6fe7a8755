"""Session fixture: the tiny model zoo, built once per test session with ``models.build``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.build import available_families
from models.common import FAMILIES

# Model names each family publishes (fixed by models/CONTRACT.md).
FAMILY_MODELS = {
    "cnn": ["cnn"],
    "transformer": ["transformer", "transformer-classifier"],
    "speech": ["speech"],
    "recommender": ["recommender"],
}


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding every present family built with ``--profile tiny``."""
    from models import build

    repo = tmp_path_factory.mktemp("tiny_zoo") / "model_repository"
    argv = ["--profile", "tiny", "--model-repository", str(repo)]
    present = available_families()  # families whose module file exists (all four once landed)
    if present != list(FAMILIES):
        argv += ["--families", ",".join(present)]
    code = build.main(argv)
    summary = (repo / build.SUMMARY_FILE).read_text() if (repo / build.SUMMARY_FILE).exists() else "none"
    assert code == 0, f"tiny zoo build failed (exit {code}); summary: {summary}"
    return repo


@pytest.fixture(scope="session")
def zoo_server(tiny_zoo: Path) -> Iterator[str]:
    """"127.0.0.1:PORT" of one real server on the session zoo (default settings), shared by every module that
    only asks it questions: tests using it never load or unload models nor read statistics or metrics."""
    from tests.conftest import run_server

    with run_server(tiny_zoo) as url:
        yield url
