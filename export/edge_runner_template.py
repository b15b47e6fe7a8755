"""Edge runner for one modelserve bundle: verify the bundle, preprocess with the server's own module, run ONNX
Runtime, print JSON.

Shipped as ``run.py`` inside every bundle written by ``modelserve edge-bundle``. Run it in isolated mode:

    python -I run.py --image digit.jpg           # cnn: PNG/JPEG/WebP/GIF/BMP/TIFF image (or .npy image rows)
    python -I run.py --text "hello" --text "hi"  # transformer / transformer-classifier
    python -I run.py --audio clip.wav            # speech: WAV (any rate, mono/stereo) or .npy at 16 kHz
    python -I run.py --user-id 3 --user-id 7     # recommender
    python -I run.py --verify-only [--public-key PUB.pem]

Order of work, so that nothing in the bundle folder runs before it is verified: (1) the bundle folder is
taken off ``sys.path`` (``-I`` already keeps it off on Python 3.11+; a dropped ``json.py`` or ``numpy.py`` is
then never imported), (2) only the standard library is imported, (3) every file is checked against
``manifest.json`` and any file the manifest does not list is refused, and with ``--public-key`` the
manifest's Ed25519 signature (``manifest.sig``) is checked, (4) only then numpy, onnxruntime and the shipped
``modelserve_processing/`` (the server's per-family preprocessing, copied verbatim) are imported.

A runner cannot vouch for itself: an edited ``run.py`` could skip all of this. Check a bundle from outside
with the installed package: ``modelserve edge-bundle --verify DIR [--public-key PUB.pem]``.

Exit status: 0 ok, 2 bad input, 3 bundle integrity check failed.
"""

import os  # already loaded by the interpreter at start-up: no sys.path search happens here
import sys

if __name__ == "__main__":
    # NOTE: before any import that searches sys.path: the bundle folder must not lend modules to this process.
    _own = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _own]
    sys.dont_write_bytecode = True  # no __pycache__ in the bundle: it would be an unlisted file next run

import argparse  # (after the sys.path cleanup above, on purpose)
import hashlib
import importlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
PROCESSING_ROOT = "modelserve_processing"


class BundleError(RuntimeError):
    """The bundle's files do not match manifest.json (or its signature)."""


def _listed(manifest: dict, key: str) -> str:
    name = manifest.get(key)
    if not isinstance(name, str) or name not in manifest.get("files", {}):
        raise BundleError(f"manifest {key} {name!r} is not one of the files the manifest lists")
    return name


def check_signature(bundle: Path, public_key: Path) -> None:
    """Ed25519 signature of manifest.json's exact bytes, in manifest.sig, against a PEM public key."""
    # NOTE: optional dependency (`cryptography`), needed only when a public key is given.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if not (bundle / SIGNATURE).is_file():
        raise BundleError(f"{SIGNATURE} is missing: the bundle is not signed")
    key = load_pem_public_key(public_key.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{public_key}: expected an Ed25519 public key (PEM)")
    try:
        key.verify((bundle / SIGNATURE).read_bytes(), (bundle / MANIFEST).read_bytes())
    except InvalidSignature:
        raise BundleError(f"{SIGNATURE}: the signature does not match manifest.json and this key") from None


def verify(bundle: Path, *, public_key: Path | None = None) -> dict:
    """Check every file against manifest.json, refuse files it does not list; return the manifest."""
    bundle = Path(bundle).resolve()
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{MANIFEST} is missing or unreadable ({exc})") from None
    if public_key is not None:
        check_signature(bundle, public_key)
    problems = []
    on_disk = set()
    for root, dirs, names in os.walk(bundle):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            on_disk.add(Path(root, name).relative_to(bundle).as_posix())
    for rel in sorted(on_disk - set(files) - {MANIFEST, SIGNATURE}):
        problems.append(f"{rel}: not listed in the manifest")
    for rel, entry in files.items():
        path = bundle / rel
        if rel.startswith("/") or ".." in rel.split("/") or path.is_symlink() or not path.is_file():
            problems.append(f"{rel}: missing (or not a plain file inside the bundle)")
            continue
        data = path.read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{rel}: checksum mismatch (expected sha256 {entry['sha256'][:16]}..., "
                            f"{entry['bytes']} bytes; found {len(data)} bytes)")
    if problems:
        raise BundleError("bundle integrity check failed: " + "; ".join(problems))
    for key in ("onnx_file", "ort_file", "preprocess_file"):
        _listed(manifest, key)
    return manifest


# --- after verification: the shipped processing module, numpy and onnxruntime -------------------------

def load_processor(spec: dict, manifest: dict):
    """The server's processor class from the shipped module, built with the bundle's arguments."""
    module_file = spec["module"].replace(".", "/") + ".py"
    if f"{PROCESSING_ROOT}/{module_file}" not in manifest["files"]:
        raise BundleError(f"preprocess module {spec['module']!r} is not a file the manifest lists")
    sys.path.insert(0, str(HERE / PROCESSING_ROOT))
    module = importlib.import_module(spec["module"])
    kwargs = dict(spec["kwargs"])
    for key, rel in spec.get("bundle_paths", {}).items():
        if rel != "." and rel not in manifest["files"]:
            raise BundleError(f"preprocess path {key}={rel!r} is not a file the manifest lists")
        kwargs[key] = HERE / rel
    return getattr(module, spec["class"])(**kwargs)


def read_items(args: argparse.Namespace, family: str) -> list:
    """Raw items as the server's task routes receive them: file bytes, texts, user ids, .npy rows."""
    import numpy as np

    def files(paths: list[str]) -> list:
        items: list = []
        for name in paths:
            if name.endswith(".npy"):
                array = np.load(name, allow_pickle=False)
                items += list(array.reshape(-1, *array.shape[-2:])) if family == "cnn" else list(array.reshape(
                    -1, array.shape[-1]))
            else:
                items.append(Path(name).read_bytes())
        return items

    if family == "cnn" and args.image:
        return files(args.image)
    if family == "transformer" and (args.text or args.text_file):
        return list(args.text or []) + [line for f in args.text_file or [] for line in
                                        Path(f).read_text().splitlines() if line.strip()]
    if family == "speech" and args.audio:
        return files(args.audio)
    if family == "recommender" and args.user_id:
        return list(args.user_id)
    flag = {"cnn": "--image", "transformer": "--text/--text-file", "speech": "--audio",
            "recommender": "--user-id"}[family]
    raise ValueError(f"this bundle holds a {family} model: give its inputs with {flag}")


def predict(processor, session, items: list, *, k: int | None) -> list[dict]:
    prepared = [processor.prepare(item, index=i) for i, item in enumerate(items)]
    names = [o.name for o in session.get_outputs()]
    params = {"k": k} if k else {}
    if processor.task == "keyword-spotting":  # clips of different lengths run one at a time
        rows = []
        for p in prepared:
            outputs = dict(zip(names, session.run(None, processor.collate([p]))))
            rows += processor.postprocess(outputs, [p], params=params)
        return rows
    outputs = dict(zip(names, session.run(None, processor.collate(prepared))))
    return processor.postprocess(outputs, prepared, params=params)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", help="PNG/JPEG/WebP/GIF/BMP/TIFF image or .npy image rows (repeatable)")
    parser.add_argument("--text", action="append", help="a text (repeatable)")
    parser.add_argument("--text-file", action="append", help="a UTF-8 file, one text per line")
    parser.add_argument("--audio", action="append", help="a WAV file or .npy 16 kHz waveform rows (repeatable)")
    parser.add_argument("--user-id", action="append", type=int, help="a user id (repeatable)")
    parser.add_argument("--k", type=int, help="labels/items returned per input (the server's 'k')")
    parser.add_argument("--onnx", action="store_true", help="run model.onnx instead of the ORT-format model")
    parser.add_argument("--public-key", type=Path, help="Ed25519 public key (PEM): also check manifest.sig")
    parser.add_argument("--verify-only", action="store_true", help="verify the bundle and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = verify(HERE, public_key=args.public_key)
    except BundleError as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 3
    if args.verify_only:
        print(json.dumps({"verified": True, "files": len(manifest["files"]), "signed": args.public_key is not None}))
        return 0
    spec = json.loads((HERE / manifest["preprocess_file"]).read_text())
    processor = load_processor(spec, manifest)
    serving_error = importlib.import_module("service.errors").ServingError  # shipped next to the module
    try:
        items = read_items(args, spec["family"])
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(HERE / (manifest["onnx_file"] if args.onnx else manifest["ort_file"])),
                                       options, providers=["CPUExecutionProvider"])
        rows = predict(processor, session, items, k=args.k)
    except (ValueError, OSError, serving_error) as exc:
        print(json.dumps({"error": f"bad input: {getattr(exc, 'message', exc)}"}), file=sys.stderr)
        return 2
    print(json.dumps({"model": manifest["model"], "variant": manifest["variant"], "predictions": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
