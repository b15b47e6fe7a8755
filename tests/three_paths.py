"""One check shared by the answer audits' tests: the server's task route, `modelserve predict` and the edge
bundle's runner give the same probabilities for the same files (one preprocessing per family)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from export import edge
from service.offline import cli as offline_cli
from tests.inprocess import inprocess_server


def _probs(results: list) -> np.ndarray:
    return np.array([[p["probability"] for p in sorted(r["predictions"], key=lambda p: p["index"])]
                     for r in results])


async def assert_predict_and_edge_match_server(zoo: Path, tmp_path: Path, *, model: str, folder: Path,
                                               paths: list[Path], flag: str, k: int, server_results: list) -> None:
    """`predict` over `folder` and the edge runner over `paths` (each passed with `flag`, e.g. "--image") give
    the probabilities the server answered (`server_results`, its task route's "results", in `paths` order)."""
    out = tmp_path / "offline.jsonl"
    assert offline_cli.main(["--model", model, "--input", str(folder), "--output", str(out), "--k", str(k),
                             "--model-repository", str(zoo)]) == 0
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["row"])
    bundle = tmp_path / "edge"
    assert edge.main(["--model", model, "--model-repository", str(zoo), "--output", str(bundle)]) == 0
    command = [sys.executable, "-I", str(bundle / "run.py"), "--k", str(k), *(a for p in paths for a in (flag, str(p)))]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    server = _probs(server_results)
    offline = _probs([r["result"] if isinstance(r["result"], dict) else json.loads(r["result"]) for r in rows])
    np.testing.assert_allclose(offline, server, atol=1e-5)
    np.testing.assert_allclose(_probs(json.loads(done.stdout)["predictions"]), server, atol=1e-5)


async def assert_three_paths_agree_on_wavs(zoo: Path, tmp_path: Path, clips: list[bytes], *, k: int = 12) -> None:
    """The WAV files `clips` through the speech task route (an in-process server), `predict` over a folder of
    them and the edge runner: the same probabilities."""
    folder = tmp_path / "clips"
    folder.mkdir()
    paths = [folder / f"{i}.wav" for i in range(len(clips))]
    for path, data in zip(paths, clips):
        path.write_bytes(data)
    async with inprocess_server(zoo) as (_, client):
        resp = await client.post("/v1/models/speech/predict", params={"k": k},
                                 json={"audio": [base64.b64encode(data).decode() for data in clips]})
    assert resp.status_code == 200, resp.text
    await assert_predict_and_edge_match_server(zoo, tmp_path, model="speech", folder=folder, paths=paths,
                                               flag="--audio", k=k, server_results=resp.json()["results"])
