"""The model zoo: every family's tiny build loads in ONNX Runtime, is described correctly, and serves.

Unit tests for the shared helpers and the cnn / recommender data code come first; zoo tests use the
session fixture ``tiny_zoo`` (tests/zoo_fixtures.py).
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build, cnn_data
from models import recommender_data as rd
from models.common import (
    FAMILIES,
    ParityError,
    export_onnx,
    ort_session,
    parity_check,
)
from service.errors import ModelLoadError
from service.modelrepo.card import CARD_KEYS
from service.modelrepo.config import parse_config_text
from service.modelrepo.publish import publish
from tests.zoo_fixtures import FAMILY_MODELS, REPO_ROOT

# NOTE: a family may be skipped only while its module file does not exist yet (written in parallel).
MODELS = [
    pytest.param(family, name, marks=pytest.mark.skipif(
        not build.family_module_path(family).is_file(), reason=f"models/{family}.py does not exist yet"))
    for family in FAMILIES for name in FAMILY_MODELS[family]
]


# ---------------------------------------------------------------- shared helpers (models/common.py)

class Doubler(torch.nn.Module):
    def __init__(self, bias: float = 0.0) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x + self.bias


@pytest.fixture(scope="module")
def doubler_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("doubler") / "model.onnx"
    return export_onnx(Doubler(), (torch.zeros(2, 3),), path, input_names=["x"], output_names=["y"],
                       dynamic_shapes={"x": {0: torch.export.Dim("batch")}})


def test_parity_check_passes_and_records_cases(doubler_onnx: Path) -> None:
    cases = [(np.ones((n, 3), np.float32),) for n in (1, 3, 17)]
    result = parity_check(Doubler(), doubler_onnx, cases, atol=1e-6, rtol=0.0)
    assert result["cases"] == [[[1, 3]], [[3, 3]], [[17, 3]]]
    assert result["max_abs_diff"] == 0.0


def test_parity_check_names_the_mismatch(doubler_onnx: Path) -> None:
    with pytest.raises(ParityError, match=r"case 0 .*output 'y': max abs diff 0\.01"):
        parity_check(Doubler(bias=0.01), doubler_onnx, [(np.ones((2, 3), np.float32),)], atol=1e-3, rtol=0.0)


DOUBLER_CONFIG = """name: "doubler"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def test_publish_writes_layout_and_replaces_atomically(doubler_onnx: Path, tmp_path: Path) -> None:
    card = {key: 0 for key in CARD_KEYS} | {"metrics": {"x": 1.0}}
    for attempt in range(2):  # the second publish replaces the first
        folder = publish(repo_dir=tmp_path, name="doubler", onnx_path=doubler_onnx, config_pbtxt=DOUBLER_CONFIG,
                         card=card | {"seed": attempt}, card_md="# doubler", assets={"extra.json": doubler_onnx})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doubler"]  # no temporary folders left
    assert {p.name for p in folder.iterdir()} == {"1", "config.pbtxt", "metrics.json", "MODEL_CARD.md", "extra.json"}
    assert json.loads((folder / "metrics.json").read_text())["seed"] == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "other"}, "names model 'doubler', expected 'other'"),
    ({"card": {"family": "x"}}, "lacks keys"),
    ({"config_pbtxt": DOUBLER_CONFIG.replace('"y"', '"z"')}, "outputs \\['z'\\] differ"),
])
def test_publish_rejects_inconsistent_models(doubler_onnx: Path, tmp_path: Path, change: dict, message: str) -> None:
    kwargs = {"repo_dir": tmp_path, "name": "doubler", "onnx_path": doubler_onnx, "config_pbtxt": DOUBLER_CONFIG,
              "card": {key: 0 for key in CARD_KEYS}, "card_md": "# doubler"} | change
    with pytest.raises(ValueError, match=message):
        publish(**kwargs)
    assert not (tmp_path / kwargs["name"]).exists()


@pytest.mark.parametrize("family", ["cnn", "recommender"])
def test_family_cli_help(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = __import__(f"models.{family}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--epochs" in capsys.readouterr().out


def test_parse_config_rejects_garbage() -> None:
    with pytest.raises(ModelLoadError, match="not a valid Triton ModelConfig"):
        parse_config_text('name: "x" max_batch_size: "many"', where="x/config.pbtxt")


# ---------------------------------------------------------------- data loaders and metrics

def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_loader_reads_gz_and_plain_and_uses_t10k(tmp_path: Path) -> None:
    images = np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9]))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 4]))
    data = cnn_data.load(f"idx:{tmp_path}")
    assert data.images.shape == (4, 1, 28, 28) and data.images.dtype == np.float32
    np.testing.assert_allclose(data.images[:, 0] * 255, images, atol=1e-4)
    assert data.labels.tolist() == [0, 1, 2, 9] and data.test_labels.tolist() == [3, 4]
    assert data.class_names == [str(d) for d in range(10)]


def test_folder_loader_and_bad_spec(tmp_path: Path) -> None:
    from PIL import Image

    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        Image.new("L", (40, 30), value).save(tmp_path / label / "a.png")
    data = cnn_data.load(f"folder:{tmp_path}")
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 1]
    assert data.images.shape == (2, 1, 28, 28) and data.images[1].min() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected 'digits', 'idx:PATH' or 'folder:PATH'"):
        cnn_data.load("mnist")


def test_movielens_formats_and_leave_one_out(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::10::5::300\n1::20::3::100\n2::10::4::50\n1::30::1::200\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,5,300\n1,20,3,100\n"
                                          "2,10,4,50\n1,30,1,200\n")
    for name in ("ratings.dat", "ratings.csv"):
        split = rd.leave_one_out(rd.load_movielens(tmp_path / name))
        assert split.user_raw.tolist() == [1, 2] and split.item_raw.tolist() == [10, 20, 30]
        # user 1's last event (t=300) is item 10; user 2 has a single event and is not evaluated
        assert split.test_users.tolist() == [0] and split.item_raw[split.test_items].tolist() == [10]
        assert sorted(split.item_raw[split.train_items].tolist()) == [10, 20, 30]
    assert len(rd.load_movielens(tmp_path / "ratings.dat", min_rating=4).users) == 2


def test_generator_is_seeded_and_zipf_skewed() -> None:
    a = rd.generate(n_users=50, n_items=200, seed=3)
    b = rd.generate(n_users=50, n_items=200, seed=3)
    assert np.array_equal(a.items, b.items) and np.array_equal(a.users, b.users)
    counts = np.sort(np.bincount(a.items))[::-1]
    assert counts[:20].sum() > 3 * counts[-20:].sum()


def test_hit_ratio_ndcg_perfect_and_constant_scorers() -> None:
    perfect = np.concatenate([np.ones((500, 1)), np.zeros((500, 99))], axis=1)
    assert rd.hit_ratio_ndcg(perfect, k=10, seed=0) == (1.0, 1.0)
    hr, _ = rd.hit_ratio_ndcg(np.zeros((5000, 100)), k=10, seed=0)
    assert abs(hr - 0.10) < 0.02  # random tie-breaking: a constant scorer is at chance


# ---------------------------------------------------------------- the tiny zoo

def _card(repo: Path, name: str) -> dict:
    return json.loads((repo / name / "metrics.json").read_text())


def _triton_type(spec) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(spec.data_type).removeprefix("TYPE_")


def _inputs(config, shape_case: list[list[int]], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped like one recorded parity case, typed as the config says."""
    from tritonclient.utils import triton_to_np_dtype

    rng = np.random.default_rng(seed)
    out = {}
    for spec, shape in zip(config.input, shape_case):
        dtype = triton_to_np_dtype(_triton_type(spec))
        out[spec.name] = (rng.random(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                          else np.ones(shape, dtype))
    return out


@pytest.mark.parametrize(("family", "name"), MODELS)
def test_published_graph_carries_no_trace_of_the_checkout_that_built_it(tiny_zoo: Path, family: str,
                                                                         name: str) -> None:
    """The exporter's per-node stack traces named this checkout's absolute path: the same model built from two
    checkouts differed byte for byte (a kept family then never equalled a rebuilt one)."""
    data = (tiny_zoo / name / "1" / "model.onnx").read_bytes()
    assert str(REPO_ROOT).encode() not in data
    assert b"pkg.torch." not in data, f"{name}: the exporter's debugging metadata was published"


def _check_shape(config, name: str, shape: tuple[int, ...], batch: int) -> None:
    dims = next(list(o.dims) for o in config.output if o.name == name)
    assert len(shape) == 1 + len(dims) and shape[0] == batch, f"{name}: {shape} vs [{batch}, {dims}]"
    assert all(d == -1 or d == s for d, s in zip(dims, shape[1:])), f"{name}: {shape} vs config dims {dims}"


def test_build_summary_lists_every_present_family(tiny_zoo: Path) -> None:
    summary = json.loads((tiny_zoo / build.SUMMARY_FILE).read_text())
    assert summary["failures"] == {} and summary["profile"] == "tiny"
    built = {r["family"] for r in summary["families"]}
    assert built == {f for f in FAMILIES if build.family_module_path(f).is_file()}


@pytest.mark.parametrize(("family", "name"), MODELS)
def test_config_and_card(tiny_zoo: Path, family: str, name: str) -> None:
    folder = tiny_zoo / name
    config = parse_config_text((folder / "config.pbtxt").read_text())
    assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size > 0
    assert (folder / "1" / "model.onnx").is_file()
    card = _card(tiny_zoo, name)
    assert set(CARD_KEYS) <= set(card) and card["family"] == family and card["profile"] == "tiny"
    values = list(card["metrics"].values())
    assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), card["metrics"]
    text = (folder / "MODEL_CARD.md").read_text()
    shown = [v for v in values if any(f"{v:.{d}f}" in text for d in range(2, 7))]
    assert shown, f"{name}: MODEL_CARD.md shows none of the held-out numbers {card['metrics']}"
    for output in config.output:
        if output.label_filename:
            labels = (folder / output.label_filename).read_text().splitlines()
            assert len(labels) == output.dims[-1], f"{output.label_filename}: {len(labels)} labels"


@pytest.mark.parametrize(("family", "name"), MODELS)
def test_onnx_runs_and_recorded_parity_holds(tiny_zoo: Path, family: str, name: str) -> None:
    config = parse_config_text((tiny_zoo / name / "config.pbtxt").read_text())
    session = ort_session(tiny_zoo / name / "1" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == [i.name for i in config.input]
    assert sorted(o.name for o in session.get_outputs()) == sorted(o.name for o in config.output)
    parity = _card(tiny_zoo, name)["parity"]
    assert parity["max_abs_diff"] <= parity["atol"]
    assert {1, 3, 17} <= {case[0][0] for case in parity["cases"]}, parity["cases"]
    for case in parity["cases"]:
        outputs = session.run(None, _inputs(config, case))
        for meta, value in zip(session.get_outputs(), outputs):
            _check_shape(config, meta.name, value.shape, case[0][0])
            assert np.all(np.isfinite(value)), f"{name}: non-finite {meta.name}"


def test_cnn_outputs_are_probabilities(tiny_zoo: Path) -> None:
    session = ort_session(tiny_zoo / "cnn" / "1" / "model.onnx")
    (probs,) = session.run(None, {"image": np.random.default_rng(0).random((5, 1, 28, 28), np.float32)})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0


def test_recommender_unknown_users_get_popular_items(tiny_zoo: Path) -> None:
    folder = tiny_zoo / "recommender"
    popular = json.loads((folder / "item_popularity.json").read_text())["items"]
    seen = json.loads((folder / "seen_items.json").read_text())
    session = ort_session(folder / "1" / "model.onnx")
    known = int(next(iter(seen)))
    ids, scores = session.run(None, {"user_id": np.array([[-1], [10**9], [known]], np.int64)})
    k = ids.shape[1]
    assert ids[0].tolist() == popular[:k] and ids[1].tolist() == popular[:k]
    assert ids[2].tolist() != popular[:k]  # a known user gets personal results
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    assert set(ids[2].tolist()) <= set(popular)  # raw item ids from the catalogue


@pytest.mark.parametrize(("family", "name"), MODELS)
def test_served_model_answers_like_onnxruntime(tiny_zoo: Path, zoo_server: str, family: str, name: str) -> None:
    import tritonclient.http as httpclient

    config = parse_config_text((tiny_zoo / name / "config.pbtxt").read_text())
    case = next(c for c in _card(tiny_zoo, name)["parity"]["cases"] if c[0][0] == 3)
    inputs = _inputs(config, case, seed=1)
    session = ort_session(tiny_zoo / name / "1" / "model.onnx")
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    client = httpclient.InferenceServerClient(zoo_server)
    assert client.is_model_ready(name)
    requests = []
    for spec in config.input:
        tensor = httpclient.InferInput(spec.name, list(inputs[spec.name].shape),
                                       _triton_type(spec))
        tensor.set_data_from_numpy(inputs[spec.name])
        requests.append(tensor)
    result = client.infer(name, requests, outputs=[httpclient.InferRequestedOutput(o.name) for o in config.output])
    for output_name, want in expected.items():
        got = result.as_numpy(output_name)
        _check_shape(config, output_name, got.shape, 3)
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3, err_msg=f"{name}/{output_name}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{name}/{output_name}")
