"""``modelserve edge-bundle``: a self-contained folder to run one model on a device with only ONNX Runtime.

    modelserve edge-bundle --model NAME [--model-repository DIR] [--target x86|arm] --output DIR [--sign-key KEY.pem]
                           [--speech-frontend graph|numpy]
    modelserve edge-bundle --verify DIR [--public-key PUB.pem]

The bundle holds the model (the ``<NAME>-int8`` variant when the repository has one, else the FP32
model) as ONNX and in ORT format, the ``required_operators.config`` written by ONNX Runtime's converter
(feed it to ORT's ``build.py --include_ops_by_config`` for a reduced-size runtime), the server's own
preprocessing module for the model's family (``modelserve_processing/``, copied verbatim), its arguments
(``preprocess.json``) and assets (``tokenizer.json``, ``seen_items.json``), a sample input, a runner
(``run.py``), a README and ``manifest.json`` with the SHA-256 and size of every other file. The runner
verifies it (and refuses any file it does not list) before it imports anything from the bundle;
``--sign-key`` adds an Ed25519 signature of the manifest (``manifest.sig``). ``--verify`` checks a bundle
from outside it, with this package's code rather than the bundle's own ``run.py``.

``--speech-frontend numpy`` (speech only): the bundle's graph is the network without its in-graph log-mel
front end (export/speech_split.py) and the shipped processing computes the features with NumPy
(``service/processing/logmel.py``, the same file the server runs): pocketfft instead of the graph's matrix
DFT on the device (on the x86 build machine the graph's radix-4 front end is now as fast at batch 32 and
faster at batch 1: docs/BENCHMARKS.md, "Speech front end in the graph, round 3"). The default, ``graph``,
ships the graph as served.

Target differences (only these): the ORT format itself is portable, but a "Fixed"-style conversion bakes
in the optimizations of the level it ran at. ``x86`` converts at level ``all`` for ``amd64`` (includes the
x86-only NCHWc layout kernels, fastest there); ``arm`` converts at level ``basic`` with
``--target_platform arm`` (constant folding and redundant-node removal only: every node stays a standard
ONNX op any ORT build has, so the file runs on arm builds, including reduced ones).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console

import service
from export import edge_runner_template as runner
from export import speech_split
from service.errors import ServingError
from service.offline.engine import load_model
from service.processing.logmel import FEATURES
from service.processing.registry import Recipe, processor_recipe

RUNNER_TEMPLATE = Path(runner.__file__)
TARGETS = {"x86": ("amd64", "all"), "arm": ("arm", "basic")}
SPEECH_FRONTENDS = ("graph", "numpy")
MANIFEST = runner.MANIFEST
# NOTE: the processing modules are shipped verbatim at their own package paths under one folder that the
# runner puts first on sys.path after verification, so their `from service.errors import ...` resolve with no
# shim and no edit: the bundle runs the bytes the server runs. These are all they may import from the project.
SHIPPED_COMMON = ("service/__init__.py", "service/errors.py", "service/processing/__init__.py",
                  "service/processing/base.py")
# What the family's module needs on the device besides onnxruntime and numpy (its third-party imports).
DEVICE_PACKAGES = {"cnn": "pillow", "transformer": "tokenizers", "speech": "soundfile soxr", "recommender": ""}


def choose_source(repo: Path, name: str) -> tuple[Path, str]:
    """The folder whose ``1/model.onnx`` goes into the bundle and its variant name (int8 or fp32)."""
    base = repo / name
    if not (base / "config.pbtxt").is_file():
        available = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()) if repo.is_dir() else []
        raise ValueError(f"no model {name!r} in repository {repo}: expected {base}/config.pbtxt "
                         f"(models there: {', '.join(available) or 'none'})")
    quantized = repo / f"{name}-int8"
    if (quantized / "1" / "model.onnx").is_file():
        return quantized, "int8"
    if not (base / "1" / "model.onnx").is_file():
        raise ValueError(f"{base}/1/model.onnx is missing")
    return base, "fp32"


def preprocess_spec(recipe: Recipe) -> tuple[dict, dict[str, Path]]:
    """(preprocess.json, assets to copy): the processor's module, class and arguments; paths become bundle files."""
    kwargs: dict[str, Any] = {}
    paths: dict[str, str] = {}
    assets: dict[str, Path] = {}
    for key, value in recipe.kwargs.items():
        if key == "model_dir":  # the recommender reads seen_items.json from its folder: the bundle
            paths[key] = "."
            if (Path(value) / "seen_items.json").is_file():
                assets["seen_items.json"] = Path(value) / "seen_items.json"
        elif isinstance(value, Path):
            paths[key] = value.name
            assets[value.name] = value
        else:
            kwargs[key] = value
    spec = {"family": recipe.family, "module": recipe.processor.__module__, "class": recipe.processor.__name__,
            "kwargs": kwargs, "bundle_paths": paths}
    return spec, assets


def shipped_sources(module: str) -> list[str]:
    """Repository-relative files of ``module`` and what it needs: ``SHIPPED_COMMON`` and the other
    ``service.processing`` modules it imports (e.g. speech's ``logmel``), checked the same way in turn;
    refuses any other project import."""
    root = Path(service.__file__).resolve().parent.parent
    files, todo = list(SHIPPED_COMMON), [module.replace(".", "/") + ".py"]
    while todo:
        own = todo.pop()
        files.append(own)
        for node in ast.walk(ast.parse((root / own).read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in ("service", "models")):
                continue
            needed = node.module.replace(".", "/") + ".py"
            if needed in files or needed in todo:
                continue
            if not needed.startswith("service/processing/"):
                raise ValueError(f"{own} imports {node.module}, which edge bundles do not ship; processing "
                                 f"modules may import only {', '.join(SHIPPED_COMMON[1:])} and service.processing")
            todo.append(needed)
    return files


def write_sample(stage: Path, family: str) -> str | None:
    """A sample input the README's command uses (None where a flag value is enough or none can be made)."""
    if family == "cnn":
        page = Image.new("RGB", (200, 240), (236, 233, 225))
        draw = ImageDraw.Draw(page)
        draw.text((100, 120), "7", fill=(30, 30, 40), font=ImageFont.load_default(size=150), anchor="mm",
                  stroke_width=4, stroke_fill=(30, 30, 40))
        page.save(stage / "sample.jpg", quality=90)
        return "sample.jpg"
    if family == "transformer":
        (stage / "sample.txt").write_text("Compress the file with gzip.\nReturn the square root of x.\n")
        return "sample.txt"
    return None


def convert_to_ort(onnx_path: Path, *, out_dir: Path, target: str) -> tuple[Path, Path]:
    """Run ONNX Runtime's converter; return (model.ort, required_operators.config) in ``out_dir``."""
    platform, level = TARGETS[target]
    work = out_dir / ".convert"
    work.mkdir(parents=True)
    shutil.copyfile(onnx_path, work / "model.onnx")
    env = {**os.environ, "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": level}
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work / "model.onnx"),
           "--output_dir", str(work), "--optimization_style", "Fixed", "--target_platform", platform]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    suffix = "" if level == "all" else f".{level}"
    ort_file, config = work / f"model{suffix}.ort", work / f"model.required_operators{suffix}.config"
    if done.returncode != 0 or not ort_file.is_file() or not config.is_file():
        raise RuntimeError(f"ORT-format conversion failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    shutil.move(ort_file, out_dir / "model.ort")
    shutil.move(config, out_dir / "required_operators.config")
    shutil.rmtree(work)
    return out_dir / "model.ort", out_dir / "required_operators.config"


def file_entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def readme(*, name: str, variant: str, target: str, spec: dict, sample: str | None) -> str:
    family = spec["family"]
    run = {"cnn": f"--image {sample}   # or any PNG/JPEG/WebP/GIF/BMP/TIFF image of a digit", "transformer": f"--text-file {sample}",
           "speech": "--audio clip.wav   # any WAV; record one: arecord -d 1 -f S16_LE -r 16000 clip.wav",
           "recommender": "--user-id 3 --user-id 7"}[family]
    packages = " ".join(p for p in ("onnxruntime numpy", DEVICE_PACKAGES[family]) if p)
    return f"""# Edge bundle: {name} ({variant}, target {target})

    python -m venv env && env/bin/pip install {packages}
    env/bin/python -I run.py {run}

`-I` (isolated mode) keeps this folder, `PYTHONPATH` and user site-packages off the import path; `run.py` also
takes the folder off itself. Before it imports anything from the bundle, `run.py` checks every file against
`manifest.json` (SHA-256 and size) and refuses a changed bundle or one with files the manifest does not list
(exit 3). `modelserve_processing/` is the server's own preprocessing for the {family} family, copied verbatim,
so the device prepares inputs exactly as `/v1/models/{name}/predict` and `modelserve predict` do;
`preprocess.json` holds its arguments. The output is the server's task answer, as JSON.

A runner cannot vouch for itself (an edited `run.py` could skip its checks): verify the bundle from outside with
`modelserve edge-bundle --verify DIR`. When the bundle was signed (`manifest.sig`, Ed25519), add
`--public-key PUB.pem` there or to `run.py` (needs `pip install cryptography`); without a signature the
manifest can be rewritten along with the files, so ship its SHA-256 out of band.

It runs `model.ort` (ORT format; `--onnx` runs `model.onnx`). `required_operators.config` lists the operators
the model needs: build a reduced ONNX Runtime with
`build.py --minimal_build --include_ops_by_config required_operators.config`.
Target `{target}`: ORT optimization level `{TARGETS[target][1]}`, platform `{TARGETS[target][0]}`.
"""


def stage_model(stage: Path, *, source: Path, spec: dict, speech_frontend: str) -> None:
    """``model.onnx`` as served, or (``speech_frontend="numpy"``) its network after the log-mel front end."""
    if speech_frontend == "graph":
        shutil.copyfile(source / "1" / "model.onnx", stage / "model.onnx")
        return
    if spec["family"] != "speech":
        raise ValueError(f"--speech-frontend numpy is for speech models; this one is {spec['family']}")
    speech_split.network_graph(source / "1" / "model.onnx", stage / "model.onnx")
    spec["kwargs"]["input_name"] = FEATURES
    spec["speech_frontend"] = "numpy"


def stage_files(stage: Path, *, repo: Path, name: str, source: Path, variant: str,
                target: str, speech_frontend: str = "graph") -> tuple[dict, str | None]:
    """Write every bundle file except the manifest into ``stage``; return (preprocess spec, sample file)."""
    base = repo / name
    try:
        recipe = processor_recipe(load_model(base, threads=1).spec, model_dir=base)
    except ServingError as exc:
        raise ValueError(f"{name}: {exc.message}") from None
    spec, assets = preprocess_spec(recipe)
    stage_model(stage, source=source, spec=spec, speech_frontend=speech_frontend)
    convert_to_ort(stage / "model.onnx", out_dir=stage, target=target)
    for asset, path in assets.items():
        shutil.copyfile(path, stage / asset)
    root = Path(service.__file__).resolve().parent.parent
    for rel in shipped_sources(spec["module"]):
        (stage / runner.PROCESSING_ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, stage / runner.PROCESSING_ROOT / rel)
    (stage / "preprocess.json").write_text(json.dumps(spec, indent=2) + "\n")
    shutil.copyfile(RUNNER_TEMPLATE, stage / "run.py")
    sample = write_sample(stage, spec["family"])
    (stage / "README.md").write_text(readme(name=name, variant=variant, target=target, spec=spec,
                                            sample=sample))
    return spec, sample


def write_bundle(*, repo: Path, name: str, output: Path, target: str, sign_key: Path | None = None,
                 speech_frontend: str = "graph") -> dict:
    """Build the bundle in a temporary sibling folder, then rename it to ``output``; return the manifest."""
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    if speech_frontend not in SPEECH_FRONTENDS:
        raise ValueError(f"--speech-frontend {speech_frontend!r}: expected one of {', '.join(SPEECH_FRONTENDS)}")
    source, variant = choose_source(repo, name)
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        spec, _ = stage_files(stage, repo=repo, name=name, source=source, variant=variant, target=target,
                              speech_frontend=speech_frontend)
        manifest = _manifest(stage, name=name, source=source, variant=variant, target=target)
        if spec["family"] == "speech":
            manifest["speech_frontend"] = speech_frontend
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if sign_key is not None:
            (stage / runner.SIGNATURE).write_bytes(sign_manifest(stage / MANIFEST, sign_key))
        if output.exists():
            shutil.rmtree(output)
        os.replace(stage, output)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return manifest


def sign_manifest(manifest: Path, key_file: Path) -> bytes:
    """Ed25519 signature of the manifest's exact bytes with a PEM (PKCS#8, unencrypted) private key."""
    # NOTE: optional dependency (the `edge` extra), needed only to sign.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"--sign-key {key_file}: cannot read an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"--sign-key {key_file}: expected an Ed25519 private key, got {type(key).__name__}")
    return key.sign(manifest.read_bytes())


def _manifest(stage: Path, *, name: str, source: Path, variant: str, target: str) -> dict:
    files = {p.relative_to(stage).as_posix(): file_entry(p) for p in sorted(stage.rglob("*")) if p.is_file()}
    return {"model": name, "source_model": source.name, "variant": variant, "target": target,
            "ort_optimization_level": TARGETS[target][1], "ort_target_platform": TARGETS[target][0],
            "onnx_file": "model.onnx", "ort_file": "model.ort", "preprocess_file": "preprocess.json",
            "converter_onnxruntime": onnxruntime.__version__, "created_unix": int(time.time()), "files": files}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelserve edge-bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model name in the repository (e.g. cnn)")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--target", choices=sorted(TARGETS), default="x86")
    parser.add_argument("--output", type=Path, help="bundle folder to write (replaced)")
    parser.add_argument("--sign-key", type=Path, help="Ed25519 private key (PEM): write manifest.sig")
    parser.add_argument("--speech-frontend", choices=SPEECH_FRONTENDS, default="graph",
                        help="speech only: log-mel inside the graph (as served) or in NumPy before it")
    parser.add_argument("--verify", type=Path, metavar="DIR", help="check an existing bundle and exit")
    parser.add_argument("--public-key", type=Path, help="with --verify: Ed25519 public key (PEM) for manifest.sig")
    args = parser.parse_args(argv)
    if args.verify is None and (not args.model or not args.output):
        parser.error("--model and --output are required to write a bundle (or give --verify DIR)")
    if args.public_key is not None and args.verify is None:
        parser.error("--public-key goes with --verify DIR")
    return args


def verify_bundle(bundle: Path, *, public_key: Path | None, console: Console) -> int:
    """Check a bundle with this package's verifier (not the bundle's own run.py): 0 ok, 3 refused."""
    try:
        manifest = runner.verify(bundle, public_key=public_key)
    except runner.BundleError as exc:
        console.print(f"[red]edge-bundle --verify {bundle}: {exc}[/red]")
        return 3
    signed = "signature ok" if public_key else "not signature-checked (no --public-key)"
    console.print(f"{bundle}: {len(manifest['files'])} files match manifest.json; {signed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    if args.verify is not None:
        return verify_bundle(args.verify, public_key=args.public_key, console=console)
    try:
        with console.status(f"bundling {args.model} for {args.target}"):
            manifest = write_bundle(repo=args.model_repository, name=args.model, output=args.output,
                                    target=args.target, sign_key=args.sign_key,
                                    speech_frontend=args.speech_frontend)
    except (ValueError, RuntimeError) as exc:
        console.print(f"[red]edge-bundle: {exc}[/red]")
        return 2
    total = sum(f["bytes"] for f in manifest["files"].values())
    console.print(f"{args.output}: {manifest['source_model']} ({manifest['variant']}), target {args.target}, "
                  f"{len(manifest['files'])} files, {total / 1e6:.2f} MB"
                  f"{', signed' if args.sign_key else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
