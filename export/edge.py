"""``modelserve edge-bundle``: a self-contained folder to run one model on a device with only ONNX Runtime.

    modelserve edge-bundle --model NAME [--model-repository DIR] [--target x86|arm] --output DIR

The bundle holds the model (the ``<NAME>-int8`` variant when the repository has one, else the FP32
model) as ONNX and in ORT format, the ``required_operators.config`` written by ONNX Runtime's converter
(feed it to ORT's ``build.py --include_ops_by_config`` for a reduced-size runtime), labels, the
preprocessing spec (``preprocess.json``) and assets (``tokenizer.json``), a small runner (``run.py``:
numpy + onnxruntime, plus tokenizers for text), a README and ``manifest.json`` with the SHA-256 and size
of every other file, which the runner verifies before it loads anything.

Target differences (only these): the ORT format itself is portable, but a "Fixed"-style conversion bakes
in the optimizations of the level it ran at. ``x86`` converts at level ``all`` for ``amd64`` (includes the
x86-only NCHWc layout kernels, fastest there); ``arm`` converts at level ``basic`` with
``--target_platform arm`` (constant folding and redundant-node removal only: every node stays a standard
ONNX op any ORT build has, so the file runs on arm builds, including reduced ones).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
from rich.console import Console

from service.modelrepo.card import read_card
from service.modelrepo.config import parse_config_text
from service.modelrepo.layout import CONFIG_FILENAME

RUNNER_TEMPLATE = Path(__file__).with_name("edge_runner_template.py")
TARGETS = {"x86": ("amd64", "all"), "arm": ("arm", "basic")}
MANIFEST = "manifest.json"
# Which preprocessing a model needs follows from its first input's name (the contract in models/CONTRACT.md).
KIND_BY_INPUT = {"image": "image", "input_ids": "text", "waveform": "audio", "user_id": "user_id"}


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


def preprocess_spec(base: Path) -> dict:
    """The JSON spec the runner follows, from the model's config.pbtxt and model card."""
    config = parse_config_text((base / CONFIG_FILENAME).read_text(), where=f"{base.name}/{CONFIG_FILENAME}")
    card = read_card(base)
    inputs = [i.name for i in config.input]
    kind = KIND_BY_INPUT.get(inputs[0])
    if kind is None:
        raise ValueError(f"{base.name}: input {inputs[0]!r} is none of {sorted(KIND_BY_INPUT)}; "
                         "no edge preprocessing is known for it")
    labelled = [o.name for o in config.output if o.label_filename]
    spec: dict = {"kind": kind, "inputs": inputs, "outputs": [o.name for o in config.output],
                  "labels": "labels.txt" if labelled else None, "class_output": labelled[0] if labelled else None}
    input_spec = card.get("input_spec", {})
    if kind == "image":
        spec.update(side=int(config.input[0].dims[-1]), invert=False, scaling=input_spec.get("scaling"),
                    notes="grayscale; resized bilinearly to side x side if needed; uint8 pixels / 255")
    elif kind == "text":
        params = config.parameters
        if "tokenizer" not in params or "max_sequence_length" not in params:
            raise ValueError(f"{base.name}: a text model's config.pbtxt needs parameters 'tokenizer' and "
                             "'max_sequence_length' (see models/CONTRACT.md)")
        spec.update(tokenizer=params["tokenizer"].string_value,
                    max_sequence_length=int(params["max_sequence_length"].string_value),
                    notes="tokenizer.json pads to the longest text and truncates at max_sequence_length")
    elif kind == "audio":
        spec.update(sample_rate=int(input_spec.get("sample_rate", 16000)), channels=1,
                    notes="16-bit PCM WAV mixed to mono, /32768, linearly resampled to sample_rate")
    else:
        spec.update(notes="INT64 user ids, one per row; unknown ids get popular items inside the graph")
    return spec


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


def readme(*, name: str, variant: str, target: str, spec: dict) -> str:
    flag = {"image": "--image digit.npy", "text": '--text "some text"', "audio": "--audio clip.wav",
            "user_id": "--user-id 3"}[spec["kind"]]
    extra = " tokenizers" if spec["kind"] == "text" else ""
    return f"""# Edge bundle: {name} ({variant}, target {target})

    python -m venv env && env/bin/pip install onnxruntime numpy{extra}
    env/bin/python run.py {flag}

`run.py` first checks every file against `manifest.json` (SHA-256 and size) and refuses to run a changed
bundle (exit 3); this catches corruption and edits, but the manifest is not signed, so it cannot stop
someone who rewrites the manifest too (ship the manifest's own SHA-256 out of band for that). It runs `model.ort` (ORT format; `--onnx` runs `model.onnx`) and prints JSON.
`preprocess.json` describes the input preprocessing the runner applies. `required_operators.config`
lists the operators the model needs: build a reduced ONNX Runtime with
`build.py --minimal_build --include_ops_by_config required_operators.config`.
Target `{target}`: ORT optimization level `{TARGETS[target][1]}`, platform `{TARGETS[target][0]}`.
"""


def write_bundle(*, repo: Path, name: str, output: Path, target: str) -> dict:
    """Build the bundle in a temporary sibling folder, then rename it to ``output``; return the manifest."""
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    source, variant = choose_source(repo, name)
    base = repo / name
    spec = preprocess_spec(base)
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        shutil.copyfile(source / "1" / "model.onnx", stage / "model.onnx")
        convert_to_ort(stage / "model.onnx", out_dir=stage, target=target)
        for asset in (spec.get("labels"), spec.get("tokenizer")):
            if asset:
                shutil.copyfile(source / asset if (source / asset).is_file() else base / asset, stage / asset)
        (stage / "preprocess.json").write_text(json.dumps(spec, indent=2) + "\n")
        shutil.copyfile(RUNNER_TEMPLATE, stage / "run.py")
        (stage / "README.md").write_text(readme(name=name, variant=variant, target=target, spec=spec))
        manifest = _manifest(stage, name=name, source=source, variant=variant, target=target)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(stage, output)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _manifest(stage: Path, *, name: str, source: Path, variant: str, target: str) -> dict:
    files = {p.relative_to(stage).as_posix(): file_entry(p) for p in sorted(stage.rglob("*")) if p.is_file()}
    return {"model": name, "source_model": source.name, "variant": variant, "target": target,
            "ort_optimization_level": TARGETS[target][1], "ort_target_platform": TARGETS[target][0],
            "onnx_file": "model.onnx", "ort_file": "model.ort", "converter_onnxruntime": onnxruntime.__version__,
            "created_unix": int(time.time()), "files": files}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modelserve edge-bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model name in the repository (e.g. cnn)")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--target", choices=sorted(TARGETS), default="x86")
    parser.add_argument("--output", type=Path, required=True, help="bundle folder to write (replaced)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        with console.status(f"bundling {args.model} for {args.target}"):
            manifest = write_bundle(repo=args.model_repository, name=args.model, output=args.output,
                                    target=args.target)
    except (ValueError, RuntimeError) as exc:
        console.print(f"[red]edge-bundle: {exc}[/red]")
        return 2
    total = sum(f["bytes"] for f in manifest["files"].values())
    console.print(f"{args.output}: {manifest['source_model']} ({manifest['variant']}), target {args.target}, "
                  f"{len(manifest['files'])} files, {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
