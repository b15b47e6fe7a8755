"""Edge-bundle integrity: nothing in the bundle runs before verification, unlisted files are refused,
`modelserve edge-bundle --verify` checks a bundle from outside it, and Ed25519 signatures of the manifest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from export import edge


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(private key, its public key, an unrelated public key), PEM files."""
    folder = tmp_path_factory.mktemp("keys")
    paths = []
    for name in ("signer", "other"):
        key = Ed25519PrivateKey.generate()
        (folder / f"{name}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (folder / f"{name}.pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        paths.append(folder / name)
    signer, other = paths
    return Path(f"{signer}.pem"), Path(f"{signer}.pub.pem"), Path(f"{other}.pub.pem")


@pytest.fixture(scope="module")
def signed_bundle(tiny_zoo, signing_keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = tmp_path_factory.mktemp("bundles") / "cnn-edge"
    assert edge.main(["--model", "cnn", "--model-repository", str(tiny_zoo), "--output", str(bundle),
                      "--sign-key", str(signing_keys[0])]) == 0
    return bundle


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def run_plain(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """`python run.py` from inside the bundle, without -I: the runner must protect itself."""
    return subprocess.run([sys.executable, "run.py", *args], capture_output=True, text=True, cwd=bundle,
                          timeout=120)


def test_dropped_modules_never_run(signed_bundle, tmp_path):
    bundle = copy_of(signed_bundle, tmp_path)
    marker = tmp_path / "pwned"
    for name in ("numpy.py", "json.py", "onnxruntime.py", "hashlib.py"):
        (bundle / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    done = run_plain(bundle, "--image", "sample.jpg")
    assert done.returncode == 3 and "numpy.py: not listed in the manifest" in done.stderr
    assert not marker.exists(), "a module dropped into the bundle ran before verification"
    # The same folder with the dropped files gone runs, and a run leaves no __pycache__ behind.
    for name in ("numpy.py", "json.py", "onnxruntime.py", "hashlib.py"):
        (bundle / name).unlink()
    for _ in range(2):
        done = run_plain(bundle, "--image", "sample.jpg")
        assert done.returncode == 0, done.stderr
    assert not list(bundle.rglob("__pycache__"))


def test_unlisted_files_and_manifest_pointers_are_refused(signed_bundle, tmp_path):
    bundle = copy_of(signed_bundle, tmp_path)
    (bundle / "modelserve_processing" / "service" / "processing" / "extra.py").write_text("x = 1\n")
    done = run_plain(bundle, "--image", "sample.jpg")
    assert done.returncode == 3 and "processing/extra.py: not listed" in done.stderr
    (bundle / "modelserve_processing" / "service" / "processing" / "extra.py").unlink()
    # A manifest pointing ort_file at a file it does not list (the file itself is also unlisted).
    shutil.copyfile(bundle / "model.onnx", bundle / "other.ort")
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "ort_file": "other.ort"}))
    done = run_plain(bundle, "--image", "sample.jpg")
    assert done.returncode == 3 and "other.ort: not listed" in done.stderr
    (bundle / "other.ort").unlink()
    done = run_plain(bundle, "--image", "sample.jpg")
    assert done.returncode == 3 and "manifest ort_file 'other.ort' is not one of the files" in done.stderr
    assert edge.main(["--verify", str(bundle)]) == 3


def test_verify_from_outside_catches_an_edited_runner(signed_bundle, tmp_path, capsys):
    bundle = copy_of(signed_bundle, tmp_path)
    assert edge.main(["--verify", str(bundle)]) == 0
    runner = bundle / "run.py"
    # An edited runner that skips its own check would still "pass" when asked itself; --verify does not.
    runner.write_text(runner.read_text().replace("manifest = verify(HERE, public_key=args.public_key)",
                                                 "manifest = json.loads((HERE / MANIFEST).read_text())"))
    assert run_plain(bundle, "--verify-only").returncode == 0
    capsys.readouterr()
    assert edge.main(["--verify", str(bundle)]) == 3
    assert "run.py: checksum mismatch" in " ".join(capsys.readouterr().err.split())


def test_signature_valid_and_invalid(signed_bundle, signing_keys, tmp_path, capsys):
    _, public, other = signing_keys
    assert (signed_bundle / "manifest.sig").is_file()
    assert edge.main(["--verify", str(signed_bundle), "--public-key", str(public)]) == 0
    assert run_plain(signed_bundle, "--verify-only", "--public-key", str(public)).returncode == 0
    capsys.readouterr()
    assert edge.main(["--verify", str(signed_bundle), "--public-key", str(other)]) == 3
    assert "signature does not match" in " ".join(capsys.readouterr().err.split())
    # Rewriting a file *and* its manifest entry passes the checksums but not the signature.
    bundle = copy_of(signed_bundle, tmp_path)
    (bundle / "README.md").write_text("changed\n")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["README.md"] = edge.file_entry(bundle / "README.md")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert edge.main(["--verify", str(bundle)]) == 0
    assert edge.main(["--verify", str(bundle), "--public-key", str(public)]) == 3
    refused = run_plain(bundle, "--image", "sample.jpg", "--public-key", str(public))
    assert refused.returncode == 3 and "signature" in refused.stderr
    (bundle / "manifest.sig").unlink()
    assert edge.main(["--verify", str(bundle), "--public-key", str(public)]) == 3


def test_bad_sign_key_is_a_clear_error(tiny_zoo, tmp_path, capsys):
    (tmp_path / "key.pem").write_text("not a key")
    assert edge.main(["--model", "cnn", "--model-repository", str(tiny_zoo), "--output", str(tmp_path / "b"),
                      "--sign-key", str(tmp_path / "key.pem")]) == 2
    assert "cannot read an unencrypted PEM private key" in " ".join(capsys.readouterr().err.split())
