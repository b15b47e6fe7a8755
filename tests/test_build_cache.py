"""tests/build_cache.py: a venv is built once per key, reused while its key holds, rebuilt when the key changes or
a build did not finish, and parallel runs wait for one build instead of racing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.build_cache import COMPLETE, cached_venv
from tests.conftest import REPO_ROOT


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "modelserve" / "test-venvs"


def test_reused_while_the_key_holds_and_rebuilt_when_it_changes(cache: Path, capfd) -> None:
    python = cached_venv("probe", requirements=[], check="import json")
    assert python.parent.parent.parent == cache and capfd.readouterr().err.startswith("building test-venvs/probe-")
    (python.parent.parent / "sentinel").write_text("kept")

    assert cached_venv("probe", requirements=[], check="import json") == python  # a hit: nothing rebuilt
    assert (python.parent.parent / "sentinel").exists() and capfd.readouterr().err == ""

    other = cached_venv("probe", requirements=[], check="import json, csv")  # another definition, another venv
    assert other != python and "building test-venvs/probe-" in capfd.readouterr().err
    assert (python.parent.parent / "sentinel").exists()  # the old key's venv is left to whoever uses it

    (python.parent.parent / COMPLETE).unlink()  # a build that was cut off before it finished
    assert cached_venv("probe", requirements=[], check="import json") == python
    assert not (python.parent.parent / "sentinel").exists() and "building" in capfd.readouterr().err


def test_parallel_runs_build_once(cache: Path) -> None:
    code = "from tests.build_cache import cached_venv; print(cached_venv('race', requirements=[], check='import json'))"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache.parent.parent), "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert len({out for out, _ in results}) == 1
    assert sum(err.count("building test-venvs/race-") for _, err in results) == 1, results


def test_only_the_most_recently_used_folders_of_a_name_are_kept(cache: Path) -> None:
    cache.mkdir(parents=True)
    now = time.time()
    for age_h, key in ((5, "old5"), (4, "old4"), (3, "old3"), (0.5, "recent")):
        (cache / f"probe-{key}").mkdir()
        (cache / f"probe-{key}" / COMPLETE).write_text(key)
        os.utime(cache / f"probe-{key}" / COMPLETE, (now - age_h * 3600,) * 2)
    (cache / "other-old").mkdir()  # another name: not this one's to prune
    python = cached_venv("probe", requirements=[], check="import json")
    kept = sorted(p.name for p in cache.iterdir() if p.is_dir())
    # KEEP = 3: the one just used, the one used half an hour ago, the most recent of the rest.
    assert kept == sorted(["other-old", python.parent.parent.name, "probe-recent", "probe-old3"]), kept
