"""Prove a ``--target arm`` edge bundle on an Arm CPU: its runner under qemu-user aarch64 emulation, with an
aarch64 Python and the aarch64 onnxruntime wheel, against the x86 server on the same inputs.

    python -m loadtests.arm_check --model-repository DIR [--model cnn] [--work DIR] [--out FILE]

Sets up (once, cached under ``--work``) everything from the package registries only:
1. ``qemu-aarch64`` from Debian bookworm-backports (``apt-get download qemu-user qemu-user-static`` with a
   private apt state, ``dpkg -x``). NOTE: bookworm's own qemu 7.2 runs the aarch64 Python but segfaults
   (``qemu: uncaught target signal 11``) inside ``import onnxruntime`` with every ``-cpu`` model; qemu 10
   runs it (7.2 hands the guest the host's x86 /proc/cpuinfo, which ORT's cpuinfo parses at import).
2. an arm64 ``python3.11`` root: Debian arm64 packages (``-o APT::Architecture=arm64``) unpacked with
   ``dpkg -x``, run with ``qemu-aarch64 -L ROOT``.
3. aarch64 wheels (``pip download --platform manylinux_2_28_aarch64 --only-binary=:all:``) unzipped into
   a site-packages folder, onnxruntime pinned to this machine's version.
Not part of CI (minutes of downloads and emulation). Prints a table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from export import edge
from export.int8_measure import parse_cpuinfo
from loadtests.serverproc import serve

PY_PACKAGES = ["python3.11", "libstdc++6", "libgomp1"]
# Packages the arm64 python3.11 closure names that an unpacked root does not need (tools, not libraries).
SKIP_PACKAGES = {"dpkg", "perl", "perl-base", "perl-modules-5.36", "libperl5.36", "tar", "install-info",
                 "mailcap", "mime-support"}
WHEELS = [f"onnxruntime=={onnxruntime.__version__}", "numpy", "pillow"]
BACKPORTS = "deb http://deb.debian.org/debian bookworm-backports main"


class SetupFailed(RuntimeError):
    """A setup step failed; the message names the step and the command's error."""


@dataclass(frozen=True)
class ArmEnv:
    qemu: Path
    root: Path
    site: Path

    def python(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        cmd = [str(self.qemu), "-L", str(self.root), str(self.root / "usr/bin/python3.11"), *args]
        return subprocess.run(cmd, cwd=cwd, env={"PATH": os.environ.get("PATH", "")}, capture_output=True, text=True, timeout=900)


def _run(step: str, cmd: list[str], *, cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SetupFailed(f"{step}: `{' '.join(cmd[:4])} ...` exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def _apt_opts(state: Path, *, arch: str | None = None, sources: Path | None = None) -> list[str]:
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    opts = [f"Dir::State={state}", f"Dir::State::status={state / 'status'}", f"Dir::Cache={state / 'cache'}"]
    if arch:
        opts += [f"APT::Architecture={arch}", f"APT::Architectures={arch}"]
    if sources:
        opts += [f"Dir::Etc::sourcelist={sources}", "Dir::Etc::sourceparts=/nonexistent"]
    return [a for opt in opts for a in ("-o", opt)]


def _download_debs(step: str, *, opts: list[str], packages: list[str], into: Path, root: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    _run(step, ["apt-get", *opts, "download", *packages], cwd=into)
    for deb in sorted(into.glob("*.deb")):
        _run(step, ["dpkg", "-x", str(deb), str(root)])


def setup_qemu(work: Path) -> Path:
    qemu = work / "qemu" / "usr" / "bin" / "qemu-aarch64"
    if qemu.exists():
        return qemu
    sources = work / "apt-bpo" / "sources.list"
    sources.parent.mkdir(parents=True, exist_ok=True)
    sources.write_text(BACKPORTS + "\n")
    opts = _apt_opts(work / "apt-bpo", sources=sources)
    _run("1. apt-get update (bookworm-backports)", ["apt-get", *opts, "update"])
    _download_debs("1. qemu-user from bookworm-backports", opts=opts, packages=["qemu-user"],
                   into=work / "apt-bpo" / "debs", root=work / "qemu")
    return qemu


def setup_python(work: Path) -> Path:
    root = work / "arm64-root"
    if (root / "usr/bin/python3.11").exists():
        return root
    opts = _apt_opts(work / "apt-arm64", arch="arm64")
    _run("2. apt-get update (arm64 lists)", ["apt-get", *opts, "update"])
    closure = _run("2. apt-cache depends (arm64 python3.11)", [
        "apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
        "--no-breaks", "--no-replaces", "--no-enhances", *PY_PACKAGES])
    names = sorted({line for line in closure.splitlines() if line and not line.startswith((" ", "<"))})
    _download_debs("2. arm64 python3.11 debs", opts=opts, packages=[n for n in names if n not in SKIP_PACKAGES],
                   into=work / "apt-arm64" / "debs", root=root)
    return root


def setup_site(work: Path, root: Path) -> Path:
    # NOTE: the root's own dist-packages, not PYTHONPATH: the runner runs isolated (-I), which ignores it.
    site = root / "usr" / "lib" / "python3" / "dist-packages"
    if (site / "onnxruntime").exists():
        return site
    wheels = work / "wheels"
    _run("3. pip download aarch64 wheels", [
        sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311", "--platform", "manylinux_2_28_aarch64",
        "--platform", "manylinux2014_aarch64", "-d", str(wheels), *WHEELS])
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    return site


def setup(work: Path) -> ArmEnv:
    root = setup_python(work)
    env = ArmEnv(qemu=setup_qemu(work), root=root, site=setup_site(work, root))
    probe = env.python("-c", "import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)",
                       cwd=work)
    if probe.returncode != 0:
        raise SetupFailed(f"4. import onnxruntime under qemu exited {probe.returncode}: {probe.stderr[-1500:]}")
    return env


def digit_inputs(folder: Path, count: int = 6) -> Path:
    from models import cnn_data

    images = cnn_data.load_digits_28().images[::97][:count]
    path = folder / "digits.npy"
    np.save(path, (np.round(images * 255) / 255).astype(np.float32))
    return path


def server_probabilities(bundle: Path, repo: Path, items: list, *, log: Path) -> np.ndarray:
    """The x86 server's output for ``items``, prepared by the server's own processor (the bundle's spec)."""
    import importlib

    import tritonclient.http as httpclient

    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = json.loads((bundle / manifest["preprocess_file"]).read_text())
    kwargs = {**spec["kwargs"], **{k: bundle / rel for k, rel in spec.get("bundle_paths", {}).items()}}
    processor = getattr(importlib.import_module(spec["module"]), spec["class"])(**kwargs)
    feed = processor.collate([processor.prepare(item, index=i) for i, item in enumerate(items)])
    with serve(repo, log_path=log) as server:
        client = httpclient.InferenceServerClient(server.url)
        inputs = []
        for name, array in feed.items():
            item = httpclient.InferInput(name, list(array.shape), "FP32")
            item.set_data_from_numpy(array, binary_data=True)
            inputs.append(item)
        output = processor.output_name
        result = client.infer(manifest["source_model"], inputs, outputs=[httpclient.InferRequestedOutput(output)])
        return result.as_numpy(output)


def arm_probabilities(env: ArmEnv, bundle: Path, args: list[str], *, onnx: bool) -> np.ndarray:
    spec = json.loads((bundle / "preprocess.json").read_text())
    k = str(len(spec["kwargs"]["labels"]))  # every class's probability, to compare whole rows
    done = env.python("-I", "run.py", "--k", k, *(["--onnx"] if onnx else []), *args, cwd=bundle)
    if done.returncode != 0:
        raise RuntimeError(f"arm runner exited {done.returncode}: {done.stderr[-2000:]}")
    rows = json.loads(done.stdout)["predictions"]
    return np.array([[p["probability"] for p in sorted(r["predictions"], key=lambda p: p["index"])] for r in rows],
                    dtype=np.float32)


def table(names: list[str], arm: dict[str, np.ndarray], x86: np.ndarray) -> str:
    lines = ["| input | x86 server top-1 | " + " | ".join(f"arm {k} top-1 | arm {k} max abs diff" for k in arm) + " |",
             "|---|---|" + "---|---|" * len(arm)]
    for i, name in enumerate(names):
        cells = [name, str(int(x86[i].argmax()))]
        for got in arm.values():
            cells += [str(int(got[i].argmax())), f"{float(np.abs(got[i] - x86[i]).max()):.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check(*, env: ArmEnv, repo: Path, model: str, work: Path) -> tuple[str, bool]:
    bundle = work / f"{model}-arm-bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    manifest = edge.write_bundle(repo=repo, name=model, output=bundle, target="arm")
    inputs = work / "inputs"
    inputs.mkdir(exist_ok=True)
    digits = digit_inputs(inputs)
    sample = bundle / "sample.jpg"
    names = [f"digits.npy[{i}]" for i in range(len(np.load(digits)))] + ["sample.jpg (shipped)"]
    items = [row[0] for row in np.load(digits)] + [sample.read_bytes()]
    args = ["--image", str(digits), "--image", str(sample)]
    arm = {"model.ort": arm_probabilities(env, bundle, args, onnx=False),
           "model.onnx": arm_probabilities(env, bundle, args, onnx=True)}
    x86 = server_probabilities(bundle, repo, items, log=work / "server.log")
    guest = env.python("-c", "print(open('/proc/cpuinfo').read())", cwd=work)
    flags = parse_cpuinfo(guest.stdout)["flags"]
    same = all(got.shape == x86.shape and (got.argmax(1) == x86.argmax(1)).all()
               and np.abs(got - x86).max() <= 1e-4 for got in arm.values())
    about = (f"model {model} -> bundle of {manifest['source_model']} ({manifest['variant']}), target arm "
             f"(ORT level {manifest['ort_optimization_level']}); onnxruntime {onnxruntime.__version__} x86 server "
             f"vs aarch64 wheel under {env.qemu.name} (guest ISA: "
             f"{', '.join(f'{k} {v}' for k, v in flags.items())}); same answers (top-1 equal, max abs diff <= 1e-4): "
             f"{'yes' if same else 'NO'}")
    return about + "\n\n" + table(names, arm, x86) + "\n", same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True, help="repository holding the model")
    parser.add_argument("--model", default="cnn", help="model to bundle (cnn: the shipped sample + digits)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "modelserve-arm-check",
                        help="cache folder for qemu, the arm64 root and wheels")
    parser.add_argument("--out", type=Path, default=Path("arm_check.md"), help="where the table is written")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        env = setup(args.work.resolve())
    except SetupFailed as exc:
        print(f"arm check could not be set up: {exc}", file=sys.stderr)
        return 3
    text, same = check(env=env, repo=args.model_repository.resolve(), model=args.model, work=args.work.resolve())
    print(text)
    args.out.write_text(text)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
