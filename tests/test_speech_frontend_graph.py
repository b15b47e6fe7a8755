"""The speech graph's log-mel front end in its radix-4 form (models/speech_frontend.py): the same features as
the form it replaced (the windowed DFT as one strided Conv) and as the NumPy definition, in PyTorch and in
ONNX Runtime, for batch 1 and N and awkward lengths; and a published graph with the earlier front end is
re-exported without training (models/speech_refront.py), speech-stream with it. No timings."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from export.common import ort_session
from models import build, speech, speech_export, speech_refront, speech_stream
from models import speech_data as sd
from models.common import export_onnx
from models.speech_frontend import HOP, LOG_EPS, N_FFT, N_MELS, LogMel, dft_basis, graph_frontend, mel_filterbank
from service.modelrepo.card import read_card
from service.processing.logmel import log_mel, num_frames

LENGTHS = (1, 2, 319, 320, 511, 512, 641, 12_345, 16_000)
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


class ConvLogMel(nn.Module):
    """The front end as exported before: the windowed DFT as one strided Conv, power, mel MatMul, Log."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("basis", torch.from_numpy(dft_basis())[:, None, :], persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_filterbank()), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        padded = F.pad(waveform, (N_FFT // 2, N_FFT // 2))
        spec = F.conv1d(padded[:, None, :], self.basis, stride=HOP)
        bins = N_FFT // 2 + 1
        power = spec[:, :bins] ** 2 + spec[:, bins:] ** 2
        return torch.log(torch.matmul(power.transpose(1, 2), self.mel) + LOG_EPS)


def _audio(batch: int, length: int, seed: int) -> np.ndarray:
    """Noise at levels from near silence to loud, one level per row."""
    rng = np.random.default_rng(seed)
    levels = np.geomspace(1e-4, 0.5, batch)[:, None] if batch > 1 else np.array([[0.1]])
    return (levels * rng.standard_normal((batch, length))).astype(np.float32)


def _torch(module: nn.Module, wave: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(wave)).numpy()


@pytest.mark.parametrize("batch", [1, 5])
def test_features_equal_the_conv_form_and_numpy(batch: int) -> None:
    new, old = LogMel().eval(), ConvLogMel().eval()
    for i, length in enumerate(LENGTHS):
        wave = _audio(batch, length, seed=i)
        got = _torch(new, wave)
        assert got.shape == (batch, num_frames(length), N_MELS)
        np.testing.assert_allclose(got, _torch(old, wave), **TOLERANCE)
        np.testing.assert_allclose(got, log_mel(wave), **TOLERANCE)


def test_exported_graph_equals_numpy_at_batch_1_and_n(tmp_path: Path) -> None:
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("samples", min=N_FFT, max=96_000)}
    path = export_onnx(LogMel(), (torch.from_numpy(_audio(3, 16_000, seed=0)),), tmp_path / "front.onnx",
                       input_names=["waveform"], output_names=["logmel"], dynamic_shapes={"waveform": dims})
    nodes = onnx.load(str(path)).graph.node
    assert not {n.op_type for n in nodes} & {"Conv", "STFT", "DFT"}
    assert [n.op_type for n in nodes].count("MatMul") == 2  # the four phases' DFTs, then power to mel
    session = ort_session(path)
    for batch in (1, 32):
        for i, length in enumerate((512, 7_777, 16_000)):
            wave = _audio(batch, length, seed=10 + i)
            got = session.run(None, {"waveform": wave})[0]
            assert got.shape == (batch, num_frames(length), N_MELS)
            np.testing.assert_allclose(got, log_mel(wave), **TOLERANCE)


def test_framed_is_forward_on_padded_input() -> None:
    """The streaming model's entry point: frames of an already padded signal, any length >= one window."""
    front = LogMel().eval()
    for length in (1, 191, 192, 500, 4_321):
        wave = _audio(2, length, seed=length)
        padded = np.pad(wave, ((0, 0), (N_FFT // 2, N_FFT // 2)))
        with torch.no_grad():
            framed = front.framed(torch.from_numpy(padded)).numpy()
        np.testing.assert_array_equal(framed, _torch(front, wave))


def test_graph_frontend_names_the_form_and_refuses_other_constants() -> None:
    new = {f"frontend.{k}": v.numpy() for k, v in LogMel().named_buffers()}
    old = {f"frontend.{k}": v.numpy() for k, v in ConvLogMel().named_buffers()}
    assert graph_frontend(new, source="new") == "radix4"
    assert graph_frontend(old, source="old") == "conv"
    with pytest.raises(ValueError, match=r"'frontend\.mel' differs"):
        graph_frontend({**old, "frontend.mel": old["frontend.mel"] * 2}, source="bad")
    with pytest.raises(ValueError, match="no log-mel front end"):
        graph_frontend({}, source="empty")


@pytest.fixture(scope="module")
def legacy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose ``speech`` (and ``speech-stream``) were exported with the earlier Conv front end."""
    torch.manual_seed(0)
    model = speech.KeywordSpotter(channels=8, blocks=1)
    model.frontend = ConvLogMel()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics as training leaves them
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.data.uniform_(-0.5, 0.5)
    tmp = tmp_path_factory.mktemp("legacy")
    clips = speech_refront.probe_signals(seed=1)
    parity = speech_export.export_and_check(model.eval(), clips, onnx_path=tmp / "model.onnx")
    card = speech_export.model_card(
        corpus=SimpleNamespace(description={"data": "random weights", "split": "none"}), model=model,
        metrics={"accuracy": 0.0, "keyword_accuracy": 0.0, "test_clips": 0.0}, per_class={}, parity=parity,
        hyper=SimpleNamespace(channels=8, blocks=1, epochs=0, batch_size=1, lr=0.0), train_clips=0,
        build_seconds=0.0, profile="tiny", seed=0)
    repo = tmp / "repo"
    speech_export.publish_model(repo_dir=repo, onnx_path=tmp / "model.onnx", card=card)
    speech_stream.publish_stream(repo_dir=repo)
    return repo


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_refresh_reexports_a_conv_front_end_graph_with_the_same_scores(legacy_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(legacy_repo, repo)
    graph = repo / "speech" / "1" / "model.onnx"
    stream = repo / "speech-stream" / "1" / "model.onnx"
    before = tmp_path / "before.onnx"
    before.write_bytes(graph.read_bytes())
    assert speech_refront.frontend_form(graph) == "conv"

    assert speech_refront.refresh(repo_dir=repo) == ["speech", "speech-stream"]
    assert speech_refront.frontend_form(graph) == "radix4"
    assert graph_frontend(_initializers(stream), source=stream) == "radix4"
    card = read_card(repo / "speech")
    assert card["parity"]["vs_previous_graph"]["max_abs_diff"] <= speech_refront.PARITY_ATOL
    for batch, length in ((1, 16_000), (7, 12_345)):
        wave = _audio(batch, length, seed=batch)
        old = ort_session(before).run(None, {"waveform": wave})[0]
        new = ort_session(graph).run(None, {"waveform": wave})[0]
        assert new.shape == (batch, len(sd.LABELS))
        np.testing.assert_allclose(new, old, atol=speech_refront.PARITY_ATOL)
    # The streaming model still answers as the whole-clip one (checked again at its publication).
    clips = [_audio(1, n, seed=n)[0] for n in (300, 16_000)]
    whole = np.concatenate([ort_session(graph).run(None, {"waveform": c[None]})[0] for c in clips])
    np.testing.assert_allclose(speech_stream.stream_scores(ort_session(stream), clips), whole, atol=1e-4)
    assert speech_refront.refresh(repo_dir=repo) == []  # already current: nothing re-published


def test_build_reexports_a_kept_conv_front_end_speech_without_training(legacy_repo: Path, tmp_path: Path,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(legacy_repo, repo)
    assert build.main(["--profile", "tiny", "--families", "speech", "--model-repository", str(repo)]) == 0
    out = capfd.readouterr()  # the build's console writes to the original stderr fd
    said = " ".join((out.out + out.err).split())  # the console wraps long lines
    assert "building speech" not in said
    assert "re-exported kept speech without training: speech, speech-stream" in said
    assert speech_refront.frontend_form(repo / "speech" / "1" / "model.onnx") == "radix4"
