"""`modelserve predict` where pyarrow (the `parquet` extra) is not installed: JSONL output still works, and a
Parquet output or input is refused up front with one line naming the extra."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from service.offline.cli import main


@pytest.fixture
def no_pyarrow(monkeypatch):
    """Make `import pyarrow` fail as it does where the package is absent."""
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)


def test_jsonl_works_and_parquet_names_the_extra(tiny_zoo, tmp_path, no_pyarrow, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((3, 28, 28), dtype=np.float32))
    args = ["--model", "cnn", "--input", str(tmp_path / "x.npy"), "--model-repository", str(tiny_zoo)]

    assert main([*args, "--output", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2] and all(r["ok"] for r in rows)

    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "out.parquet")]) == 2
    err = capsys.readouterr().err
    assert "Parquet output" in err and "pip install 'modelserve[parquet]'" in err
    assert not list(tmp_path.glob("out.parquet*"))  # refused before anything was written


def test_parquet_input_names_the_extra(tiny_zoo, tmp_path, no_pyarrow, capsys):
    (tmp_path / "users.parquet").write_bytes(b"PAR1")
    assert main(["--model", "recommender", "--input", str(tmp_path / "users.parquet"), "--output",
                 str(tmp_path / "out.jsonl"), "--model-repository", str(tiny_zoo)]) == 2
    err = capsys.readouterr().err
    assert "Parquet input" in err and "pip install 'modelserve[parquet]'" in err
