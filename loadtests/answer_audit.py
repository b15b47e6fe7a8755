"""Accuracy of the default zoo's cnn on realistic digit photos, per condition, through a real server.

    python -m loadtests.answer_audit --zoo /tmp/defzoo3 [--per-condition 60] [--code-root OTHER_CHECKOUT]
                                     [--before-zoo OTHER_ZOO]

Starts `modelserve serve` on a copy of the zoo's cnn (loopback port), sends the held-out digits as the
training-layout tensor over V2 (the model's own held-out accuracy, through the server) and as photos
(tests/digit_photos.py: one condition at a time) to /v1/models/cnn/predict, and prints top-1 accuracy per
condition. With --code-root, the same photos also go to a server run from another checkout (e.g. the commit
before a fix), side by side; with --before-zoo, another zoo's cnn (e.g. before retraining) is served beside it.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from loadtests.serverproc import REPO_ROOT, serve
from tests.digit_photos import CONDITIONS, photos
from tests.task_media import held_out_digits

CHUNK = 16  # images per /v1 request


def _v1_labels(client: httpx.Client, files: list[bytes]) -> list[str]:
    labels = []
    for start in range(0, len(files), CHUNK):
        images = [base64.b64encode(f).decode() for f in files[start:start + CHUNK]]
        resp = client.post("/v1/models/cnn/predict", json={"images": images})
        if resp.status_code != 200:
            labels += [f"HTTP {resp.status_code}: {resp.json().get('error', '')[:80]}"] * len(images)
            continue
        labels += [r["predictions"][0]["label"] for r in resp.json()["results"]]
    return labels


def _v2_accuracy(client: httpx.Client, laid: np.ndarray, truth: np.ndarray) -> float:
    correct = 0
    for start in range(0, len(laid), 64):  # the cnn's max_batch_size
        rows = laid[start:start + 64]
        body = {"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.astype(np.float32).ravel().tolist()}]}
        resp = client.post("/v2/models/cnn/infer", json=body)
        resp.raise_for_status()
        probs = np.asarray(resp.json()["outputs"][0]["data"], np.float32).reshape(len(rows), -1)
        correct += int((probs.argmax(1) == truth[start:start + 64]).sum())
    return correct / len(laid)


def serve_side_by_side(stack: ExitStack, *, zoo: Path, model: str, code_root: Path | None,
                       before_zoo: Path | None = None) -> dict[str, httpx.Client]:
    """A client per server ("now": this checkout on `zoo`; "before": `code_root`'s server and/or `before_zoo`'s
    model, if given), each serving a temporary copy of its zoo's `model`; all stopped when `stack` closes."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    sides = {"now": (zoo, REPO_ROOT)}
    if code_root or before_zoo:
        sides["before"] = (before_zoo or zoo, (code_root or REPO_ROOT).resolve())
    clients = {}
    for name, (side_zoo, root) in sides.items():
        repo = tmp / name / "repo"
        shutil.copytree(side_zoo / model, repo / model)
        proc = stack.enter_context(serve(repo, log_path=tmp / f"{name}.log", code_root=root))
        clients[name] = stack.enter_context(httpx.Client(base_url=f"http://{proc.url}", timeout=300))
    return clients


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("/tmp/defzoo3"))
    parser.add_argument("--per-condition", type=int, default=60, help="held-out digits per condition (max 360)")
    parser.add_argument("--code-root", type=Path, help="another checkout to compare against (its server)")
    parser.add_argument("--before-zoo", type=Path, help="another zoo whose cnn to compare against (e.g. before retraining)")
    parser.add_argument("--only", nargs="*", default=[], help="conditions whose name contains one of these")
    args = parser.parse_args(argv)
    images8, truth, laid = held_out_digits(360)
    pick = np.linspace(0, 359, args.per_condition).astype(int)
    with ExitStack() as stack:
        clients = serve_side_by_side(stack, zoo=args.zoo, model="cnn", code_root=args.code_root,
                                     before_zoo=args.before_zoo)
        print(f"load average {os.getloadavg()}; {len(pick)} held-out digits per condition")
        for name, client in clients.items():
            print(f"[{name}] training layout over V2: {_v2_accuracy(client, laid[pick], truth[pick]):.3f}")
        print(f"{'condition':30s} " + " ".join(f"{n:>8s} {'s':>6s}" for n in clients))
        for condition, photo in CONDITIONS.items():
            if args.only and not any(o in condition for o in args.only):
                continue
            files = photos(images8[pick], photo, seed=1)
            row = []
            for client in clients.values():
                start = time.perf_counter()
                got = _v1_labels(client, files)
                accuracy = np.mean([g == str(t) for g, t in zip(got, truth[pick])])
                row.append(f"{accuracy:8.3f}")
                errors = {g for g in got if g.startswith("HTTP")}
                row.append(f"{time.perf_counter() - start:6.1f}" + (f" {sorted(errors)[0]}" if errors else ""))
            print(f"{condition:30s} " + " ".join(row), flush=True)
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
