"""`python -m loadtests.dispatch_ab`: copies of one model differing only in their batching wait, served side by
side; each copy's config is the variant it names, and every cell is measured and tabled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import dispatch_ab
from service.modelrepo.config import parse_config_text


def test_each_variant_config_is_the_wait_it_names(tiny_zoo: Path) -> None:
    own = (tiny_zoo / "cnn" / "config.pbtxt").read_text()
    fixed = parse_config_text(dispatch_ab.variant_config("fixed:0", zoo_config=own, name="fixed_0"))
    adaptive = parse_config_text(dispatch_ab.variant_config("adaptive:3000", zoo_config=own, name="adaptive_3000"))
    zoo = parse_config_text(dispatch_ab.variant_config("zoo", zoo_config=own, name="zoo"))
    assert fixed.dynamic_batching.max_queue_delay_microseconds == 0
    assert fixed.parameters["adaptive_batching"].string_value == "false"
    assert adaptive.dynamic_batching.max_queue_delay_microseconds == 3000
    assert adaptive.parameters["adaptive_batching"].string_value == "true"
    assert zoo.name == "zoo" and zoo.dynamic_batching == parse_config_text(own).dynamic_batching
    with pytest.raises(SystemExit, match="expected fixed:<delay us>"):
        dispatch_ab.variant_config("fixed:soon", zoo_config=own, name="x")
    with pytest.raises(SystemExit, match="MODELSERVE_KEY=VALUE"):
        dispatch_ab.parse_servers("spin:ALLOW_SPINNING=true")


def test_a_run_serves_every_variant_on_every_server_and_writes_the_table(tiny_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert dispatch_ab.main(["--zoo", str(tiny_zoo), "--variants", "fixed:0,adaptive:3000,zoo",
                             "--servers", "a,b:MODELSERVE_ALLOW_SPINNING=true", "--concurrency", "2",
                             "--client", "python", "--rounds", "1", "--seconds", "0.3",
                             "--ceiling-seconds", "0.05", "--output", str(out)]) == 0
    cells = json.loads((out / "dispatch_ab.json").read_text())
    assert {(c["variant"], c["label"]) for c in cells} == {(v, s) for v in ("fixed:0", "adaptive:3000", "zoo")
                                                            for s in ("a", "b")}
    assert all(c["rows_per_s"] > 0 and c["errors"] == 0 for c in cells)
    text = (out / "dispatch_ab.md").read_text()
    assert text.count("\n| binary | 2 |") == 6 and "ratio = rows/s over the in-process ceiling" in text
