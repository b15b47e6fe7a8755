"""Edge bundles: the shipped runner, in a fresh virtualenv holding only onnxruntime + numpy (+ Pillow for
images, tokenizers for text), predicts what the real server predicts on the same inputs, preprocessing with the
server's own module; checksums verify; tampering is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from export import edge
from service.processing import image
from tests.build_cache import cached_venv

RUNNER_PACKAGES = ("onnxruntime", "numpy", "tokenizers", "pillow")


@pytest.fixture(scope="session")
def edge_python() -> Path:
    """A virtualenv with only the runner's packages (same versions as the project's, from pip's local cache),
    cached across sessions (tests/build_cache.py); every session re-checks nothing of the project is importable."""
    pins = [f"{name}=={metadata.version(name)}" for name in RUNNER_PACKAGES]
    python = cached_venv("edge-runner", requirements=pins, check="import onnxruntime, numpy, tokenizers, PIL")
    for foreign in ("torch", "models", "service", "tritonclient"):
        found = subprocess.run([str(python), "-I", "-c", f"import {foreign}"], capture_output=True,
                               cwd=python.parent)
        assert found.returncode != 0, f"the edge venv must not provide {foreign}"
    return python


def run_bundle(python: Path, bundle: Path, *args: str) -> subprocess.CompletedProcess:
    # -I: isolated mode, so neither PYTHONPATH nor the current folder can lend the runner project code.
    return subprocess.run([str(python), "-I", str(bundle / "run.py"), *args], capture_output=True, text=True,
                          cwd=bundle, timeout=120)


def server_outputs(url: str, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict:
    client = httpclient.InferenceServerClient(url)
    infer_inputs = []
    for name, array in inputs.items():
        item = httpclient.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
        item.set_data_from_numpy(array, binary_data=True)
        infer_inputs.append(item)
    result = client.infer(model, infer_inputs, outputs=[httpclient.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def write_png(path: Path, pixels: np.ndarray) -> None:
    """8-bit grayscale PNG, filter type 0 (written here so the test does not rely on the runner's decoder)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def predictions(done: subprocess.CompletedProcess) -> list[dict]:
    assert done.returncode == 0, f"runner failed ({done.returncode}): {done.stderr}"
    return json.loads(done.stdout)["predictions"]


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from models import cnn_data

    images = cnn_data.load_digits_28().images[::97][:12]
    return (np.round(images * 255) / 255).astype(np.float32)  # exactly representable as 8-bit PNG pixels


def test_cnn_bundle_matches_server_and_verifies(tiny_zoo, zoo_server, edge_python, digits, tmp_path):
    bundle = tmp_path / "cnn-edge"
    assert edge.main(["--model", "cnn", "--model-repository", str(tiny_zoo), "--output", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk >= {"model.onnx", "model.ort", "required_operators.config",
                                                 "preprocess.json", "run.py", "README.md", "sample.jpg",
                                                 "modelserve_processing/service/processing/image.py"}
    shipped = bundle / "modelserve_processing" / "service" / "processing" / "image.py"
    assert shipped.read_bytes() == Path(image.__file__).read_bytes()  # the server's module, verbatim
    for name, entry in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    assert manifest["variant"] == "fp32" and manifest["ort_optimization_level"] == "all"
    np.save(tmp_path / "digits.npy", digits[:8])
    write_png(tmp_path / "digit.png", np.round(digits[8, 0] * 255).astype(np.uint8))
    rows = predictions(run_bundle(edge_python, bundle, "--k", "10", "--image", str(tmp_path / "digits.npy"),
                                  "--image", str(tmp_path / "digit.png")))
    labels = (tiny_zoo / "cnn" / "labels.txt").read_text().splitlines()
    # The server's model input for the same images, prepared by the same module in this process.
    processor = image.ImageProcessor(input_name="image", output_name="probabilities", labels=labels)
    feed = processor.collate([processor.prepare(d[0], index=i) for i, d in enumerate(digits[:9])])
    expected = server_outputs(zoo_server, "cnn", feed, ["probabilities"])["probabilities"]
    got = np.array([[p["probability"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in rows],
                   dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r["predictions"][0]["label"] for r in rows] == [labels[i] for i in expected.argmax(1)]
    assert predictions(run_bundle(edge_python, bundle, "--image", str(bundle / "sample.jpg")))  # README's sample
    # A changed byte anywhere is caught before the model is loaded.
    data = bytearray((bundle / "model.ort").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.ort").write_bytes(bytes(data))
    refused = run_bundle(edge_python, bundle, "--image", str(tmp_path / "digits.npy"))
    assert refused.returncode == 3 and "model.ort: checksum mismatch" in refused.stderr
    assert refused.stdout == ""


def test_text_bundle_matches_server(tiny_zoo, zoo_server, edge_python, tmp_path):
    from tokenizers import Tokenizer

    bundle = tmp_path / "clf-edge"
    assert edge.main(["--model", "transformer-classifier", "--model-repository", str(tiny_zoo),
                      "--output", str(bundle)]) == 0
    texts = ["Compress the file with gzip.", "Open a TCP socket and connect to the host.",
             "Return the square root of x.", "Parse an XML document into an element tree."]
    labels = (tiny_zoo / "transformer-classifier" / "labels.txt").read_text().splitlines()
    rows = predictions(run_bundle(edge_python, bundle, "--k", str(len(labels)),
                                  *(a for t in texts for a in ("--text", t))))
    tokenizer = Tokenizer.from_file(str(tiny_zoo / "transformer-classifier" / "tokenizer.json"))
    encodings = tokenizer.encode_batch(texts)
    feed = {"input_ids": np.array([e.ids for e in encodings], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], np.int64)}
    expected = server_outputs(zoo_server, "transformer-classifier", feed, ["probabilities"])["probabilities"]
    got = [[p["probability"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in rows]
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)
    assert [r["predictions"][0]["label"] for r in rows] == [labels[i] for i in expected.argmax(1)]


def test_arm_bundle_prefers_int8_variant(tiny_zoo, edge_python, digits, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_zoo / "cnn", repo / "cnn")
    # export/quantize.py publishes real int8 variants; here a copy of cnn with other bytes shows which
    # file the bundle took.
    shutil.copytree(tiny_zoo / "cnn", repo / "cnn-int8")
    import onnx

    stand_in = onnx.load(str(repo / "cnn-int8" / "1" / "model.onnx"))
    stand_in.doc_string = "stand-in for a quantized variant"  # same graph, different bytes
    onnx.save(stand_in, str(repo / "cnn-int8" / "1" / "model.onnx"))
    bundle = tmp_path / "cnn-arm"
    assert edge.main(["--model", "cnn", "--model-repository", str(repo), "--target", "arm",
                      "--output", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (manifest["source_model"], manifest["variant"]) == ("cnn-int8", "int8")
    assert (manifest["ort_optimization_level"], manifest["ort_target_platform"]) == ("basic", "arm")
    bundled = (bundle / "model.onnx").read_bytes()
    assert bundled == (repo / "cnn-int8" / "1" / "model.onnx").read_bytes()
    assert bundled != (repo / "cnn" / "1" / "model.onnx").read_bytes()
    # basic level keeps standard ONNX ops only: no x86-specific NCHWc kernels in the reduced-build config.
    assert "nchwc" not in (bundle / "required_operators.config").read_text()
    np.save(tmp_path / "d.npy", digits[:4])
    rows = predictions(run_bundle(edge_python, bundle, "--image", str(tmp_path / "d.npy")))
    onnx_rows = predictions(run_bundle(edge_python, bundle, "--onnx", "--image", str(tmp_path / "d.npy")))
    np.testing.assert_allclose([r["predictions"][0]["probability"] for r in rows],
                               [r["predictions"][0]["probability"] for r in onnx_rows], atol=1e-5)
    bad = run_bundle(edge_python, bundle, "--text", "not an image")
    assert bad.returncode == 2 and "--image" in bad.stderr


def test_unknown_model_is_a_clear_error(tiny_zoo, tmp_path, capsys):
    assert edge.main(["--model", "nope", "--model-repository", str(tiny_zoo), "--output", str(tmp_path / "b")]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
