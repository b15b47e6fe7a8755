"""Re-export a published ``speech`` model with the current in-graph front end, without training.

The DS-CNN weights are read back from the published graph (BatchNorm already folded, as
models/speech_stream.py does), put behind ``models.speech_frontend.LogMel`` and exported as
``models.speech`` exports; the new graph must give the old graph's scores (``PARITY_ATOL``) on test
signals, or nothing is published. ``modelserve build`` runs it on a kept ``speech`` whose graph still has
the earlier front end (the windowed DFT as one strided Conv), then re-derives ``speech-stream``.

    python -m models.speech_refront --model-repository REPO   # REPO/speech (and speech-stream) re-exported
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from models import speech_export, speech_stream
from models.speech_frontend import SAMPLE_RATE, LogMel, graph_frontend
from service.modelrepo.card import read_card
from service.modelrepo.layout import CONFIG_FILENAME
from service.modelrepo.sessions import create_session

NAME = speech_export.NAME
PARITY_ATOL = 1e-4


class FoldedKeywordSpotter(nn.Module):
    """models.speech.KeywordSpotter in eval form (BatchNorm folded, no dropout), current front end."""

    def __init__(self, *, stem: nn.Conv2d, blocks: list[speech_stream.FoldedBlock], head: nn.Linear) -> None:
        super().__init__()
        self.frontend = LogMel()
        # Sequential containers: the graph's initializers keep a trained export's names (stem.0.*, blocks.N.*).
        self.stem, self.blocks, self.head = nn.Sequential(stem), nn.Sequential(*blocks), head

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        feats = self.frontend(waveform)
        feats = feats - feats.mean(dim=(1, 2), keepdim=True)
        x = self.blocks(F.relu(self.stem(feats[:, None])))
        return torch.softmax(self.head(x.mean(dim=(2, 3))), dim=-1)


def frontend_form(onnx_path: Path) -> str:
    """``"radix4"`` (current) or ``"conv"`` (earlier) for a published speech graph."""
    graph = onnx.load(str(onnx_path)).graph
    return graph_frontend({t.name: numpy_helper.to_array(t) for t in graph.initializer}, source=onnx_path)


def probe_signals(seed: int = 0) -> np.ndarray:
    """Noise from near silence to loud, and tones: one second each, as many as the export's parity needs."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    noise = [level * rng.standard_normal(SAMPLE_RATE) for level in (1e-4, 1e-3, 1e-2, 0.1, 0.3) for _ in range(2)]
    tones = [0.5 * np.sin(2 * np.pi * hz * t) + 1e-3 * rng.standard_normal(SAMPLE_RATE)
             for hz in (100, 440, 1000, 2500, 4000, 6000, 7700)]
    chirp = [0.3 * np.sin(2 * np.pi * (50 + 3900 * t) * t)]
    return np.stack(noise + tones + chirp).astype(np.float32)


def refront(onnx_path: Path, dst: Path) -> dict:
    """Write ``dst``: the graph at ``onnx_path`` with the current front end. Returns the parity record
    (new graph vs PyTorch, and vs the old graph); raises when the scores differ by more than PARITY_ATOL."""
    stem, blocks, head = speech_stream.load_folded(onnx_path)
    model = FoldedKeywordSpotter(stem=stem, blocks=blocks, head=head)
    clips = probe_signals()
    parity = speech_export.export_and_check(model.eval(), clips, onnx_path=dst)
    before = create_session(onnx_path).run(None, {"waveform": clips})[0]
    after = create_session(dst).run(None, {"waveform": clips})[0]
    worst = float(np.abs(after - before).max())
    if worst > PARITY_ATOL or not np.array_equal(after.argmax(axis=1), before.argmax(axis=1)):
        raise ValueError(f"{onnx_path}: re-exported scores differ from the published graph's by {worst:.2e} "
                         f"(> {PARITY_ATOL}) or in their top class; not re-exported")
    return {**parity, "vs_previous_graph": {"max_abs_diff": worst, "atol": PARITY_ATOL, "clips": len(clips)}}


def refresh(*, repo_dir: Path) -> list[str]:
    """Re-export ``speech`` if its graph has the earlier front end, then re-derive ``speech-stream`` if published;
    returns the models re-published (none when the graph is current)."""
    model_dir = Path(repo_dir) / NAME
    onnx_path = model_dir / "1" / "model.onnx"
    if frontend_form(onnx_path) == "radix4":
        return []
    card = read_card(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        parity = refront(onnx_path, Path(tmp) / "model.onnx")
        card = {**card, "parity": parity, "reexported": "front end re-exported (radix-4 DFT in MatMuls), weights unchanged"}
        speech_export.publish_model(repo_dir=Path(repo_dir), onnx_path=Path(tmp) / "model.onnx", card=card)
    if not (Path(repo_dir) / speech_stream.NAME / CONFIG_FILENAME).is_file():
        return [NAME]
    speech_stream.publish_stream(repo_dir=Path(repo_dir))
    return [NAME, speech_stream.NAME]


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.speech_refront", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    args = parser.parse_args(argv)
    done = refresh(repo_dir=args.model_repository)
    print(f"re-exported: {', '.join(done)}" if done else f"{NAME}: front end already current, nothing to do")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
