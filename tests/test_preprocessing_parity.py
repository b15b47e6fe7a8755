"""One preprocessing per family: the server's task route, `modelserve predict` and the edge runner give the
same answers on real-looking digit photos (tests/drawn_digits.py: DejaVu fonts on noisy paper, JPEG and PNG),
because all three run service/processing/image.py (the bundle ships it verbatim)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np

from export import edge
from service.offline import cli as offline_cli
from tests.drawn_digits import drawn_digits
from tests.inprocess import inprocess_server


def _probabilities(result: dict) -> list[float]:
    return [p["probability"] for p in sorted(result["predictions"], key=lambda p: p["index"])]


async def test_server_offline_and_edge_agree_on_drawn_digits(tiny_zoo, tmp_path):
    photos = drawn_digits(10)
    folder = tmp_path / "photos"
    folder.mkdir()
    names = []
    for i, (_, data, fmt) in enumerate(photos):
        names.append(folder / f"{i:02d}.{'jpg' if fmt == 'JPEG' else 'png'}")
        names[-1].write_bytes(data)
    assert {fmt for _, _, fmt in photos} == {"JPEG", "PNG"}

    async with inprocess_server(tiny_zoo) as (_, client):
        files = [("file", (p.name, p.read_bytes(), "image/jpeg" if p.suffix == ".jpg" else "image/png"))
                 for p in names]
        response = await client.post("/v1/models/cnn/predict", files=files, params={"k": 10})
    assert response.status_code == 200, response.text
    server = response.json()["results"]
    assert all(r["preprocessing"]["inverted"] for r in server)  # dark ink on light paper was detected

    out = tmp_path / "offline.jsonl"
    assert offline_cli.main(["--model", "cnn", "--input", str(folder), "--output", str(out), "--k", "10",
                             "--model-repository", str(tiny_zoo)]) == 0
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["row"])
    offline = [r["result"] if isinstance(r["result"], dict) else json.loads(r["result"]) for r in rows]

    bundle = tmp_path / "cnn-edge"
    assert edge.main(["--model", "cnn", "--model-repository", str(tiny_zoo), "--output", str(bundle)]) == 0
    command = [sys.executable, "-I", str(bundle / "run.py"), "--k", "10", *(a for p in names for a in ("--image", str(p)))]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, cwd=tmp_path,
                                   timeout=120)
    assert done.returncode == 0, done.stderr
    edge_rows = json.loads(done.stdout)["predictions"]

    top1 = {where: [r["predictions"][0]["label"] for r in results]
            for where, results in (("server", server), ("offline", offline), ("edge", edge_rows))}
    assert top1["server"] == top1["offline"] == top1["edge"], top1
    for results in (offline, edge_rows):
        np.testing.assert_allclose([_probabilities(r) for r in results], [_probabilities(r) for r in server],
                                   atol=1e-5)
    # NOTE: the tiny zoo's cnn (seconds of training, ~0.4 held-out accuracy) is too weak to assert 9/10 here;
    # the default zoo's cnn is measured by hand (see the README section "One preprocessing per family").


def test_layout_matches_mnist_conventions():
    """Dark-on-light photo -> white ink on black, 20x20 box, centre of mass at the 28x28 centre."""
    from service.processing.image import ImageProcessor

    processor = ImageProcessor(input_name="image", output_name="p", labels=None)
    _, data, _ = drawn_digits(1, seed=3)[0]
    prepared = processor.prepare(data, index=0)
    pixels = prepared.pixels[0]
    assert prepared.inverted and pixels.shape == (28, 28)
    assert pixels.max() == 1.0 and pixels[0].max() == 0.0 and pixels[:, 0].max() == 0.0  # paper removed
    ys, xs = np.nonzero(pixels)
    assert ys.max() - ys.min() < 21 and xs.max() - xs.min() < 21
    rows, cols = np.indices(pixels.shape)
    centre = ((rows * pixels).sum() / pixels.sum(), (cols * pixels).sum() / pixels.sum())
    assert abs(centre[0] - 13.5) <= 1.0 and abs(centre[1] - 13.5) <= 1.0
    # The training layout (white on black, already centred) is left as white on black.
    again = processor.prepare(pixels, index=0)
    assert not again.inverted
