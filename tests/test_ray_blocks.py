"""The Ray engine's native Arrow blocks: each payload kind survives Ray Data's own conversion, and whole jobs
over arrays, texts (with bad and oddly typed rows) and user ids give the local engine's rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.offline.cli import main
from service.offline.readers import Item

ray = pytest.importorskip("ray")
# Ray Data reads its own deprecated settings when it builds a batch; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

from ray.data.block import BlockAccessor  # noqa: E402

from service.offline.ray_blocks import from_columns, to_block  # noqa: E402
from service.offline.ray_engine import block_rows  # noqa: E402


def _through_ray_data(items: list[Item]) -> tuple[str, list[Item]]:
    """The payload column's kind, and the items as an actor receives them (Ray Data's numpy batch format)."""
    block = to_block(items)
    kind = next(c for c in block.column_names if c not in ("row", "id", "error"))
    return kind, from_columns(BlockAccessor.for_block(block).to_batch_format("numpy"))


@pytest.mark.parametrize(("payloads", "kind"), [
    (["a text", "", "ünïcode"], "text"),
    ([b"\x89PNG...", b"", b"RIFF"], "bytes"),
    ([1, 987654321, 0], "int"),
    (["a text", 5, ["a", "list"]], "pickle"),  # JSONL `text` fields that are not strings stay as they were
])
def test_payloads_keep_their_values(payloads, kind):
    items = [Item(10 + i, f"id{i}", p) for i, p in enumerate(payloads)] + [Item(13, "bad", error="unreadable")]
    found, back = _through_ray_data(items)
    assert found == kind
    assert [(it.row, it.id, it.payload, it.error) for it in back] == \
        [(it.row, it.id, it.payload, it.error) for it in items]
    assert all(type(a.payload) is type(b.payload) for a, b in zip(items, back))


def test_arrays_travel_as_one_tensor_column():
    arrays = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
    items = [Item(i, str(i), arrays[i]) for i in range(5)] + [Item(5, "5", error="row 5 unreadable")]
    kind, back = _through_ray_data(items)
    assert kind == "array" and [it.row for it in back] == list(range(6))
    np.testing.assert_array_equal(np.stack([it.payload for it in back[:5]]), arrays)
    assert (back[5].payload, back[5].error) == (None, "row 5 unreadable")


def test_blocks_share_a_window_among_actors_in_whole_model_batches():
    assert block_rows(2048, batch_size=32, actors=3) == 704  # 3 calls, one per actor
    assert block_rows(3, batch_size=4, actors=3) == 4  # never below one model batch
    assert block_rows(100, batch_size=8, actors=1) == 104


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _job_inputs(root):
    np.save(root / "x.npy", np.random.default_rng(1).random((7, 28, 28), dtype=np.float32))
    lines = [json.dumps({"id": f"t{i}", "text": f"text number {i}"}) for i in range(4)]
    lines += ["{not json", json.dumps({"id": "n", "text": 5}), json.dumps({"id": "e", "text": ""})]
    (root / "texts.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"user_id": [1, 2, 3, None, 5]}), root / "users.parquet")
    return [("cnn", root / "x.npy"), ("transformer-classifier", root / "texts.jsonl"),
            ("recommender", root / "users.parquet")]


def test_jobs_on_ray_give_the_local_rows(tiny_zoo, local_ray, tmp_path):
    for model, src in _job_inputs(tmp_path):
        if not (tiny_zoo / model).is_dir():
            continue
        rows = {}
        for engine in ("local", "ray"):
            out = tmp_path / f"{model}-{engine}.jsonl"
            # 3-row parts over 2 actors: several blocks, some all text, one mixing a number into the texts
            assert main(["--model", model, "--input", str(src), "--output", str(out), "--model-repository",
                         str(tiny_zoo), "--batch-size", "2", "--part-rows", "3", "--engine", engine]) == 0
            rows[engine] = [json.loads(line) for line in out.read_text().splitlines()]
        local, remote = rows["local"], rows["ray"]
        assert [(r["row"], r["id"], r["ok"], r["error"]) for r in local] == \
            [(r["row"], r["id"], r["ok"], r["error"]) for r in remote], model
        assert _close([r["result"] for r in local], [r["result"] for r in remote]), model
        assert any(r["ok"] for r in local), model
