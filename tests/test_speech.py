"""speech family: synthesis, in-graph front end, ONNX parity, Speech Commands loader, serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import speech, speech_commands, speech_export
from models import speech_data as sd
from models.common import ParityError, export_onnx, ort_session, parity_check
from models.speech_frontend import LogMel, log_mel_reference, mel_filterbank
from models.speech_synth import ESpeak, synth_word


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech-synth")


@pytest.fixture(scope="module")
def speech_repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding the tiny ``speech`` build: the shared tiny zoo if defined, else our own."""
    try:
        return Path(request.getfixturevalue("tiny_zoo"))
    except pytest.FixtureLookupError:
        repo = tmp_path_factory.mktemp("speech-repo")
        speech.build(profile="tiny", repo_dir=repo, seed=0, work_dir=tmp_path_factory.mktemp("speech-work"))
        return repo


def _spoken(word: str, cache_dir: Path, *, voice: str = "en-us+m3") -> np.ndarray:
    """One-second clip with ``word`` in the middle."""
    audio = synth_word(word, voice=voice, rate=170, pitch=50, cache_dir=cache_dir)
    return sd.place(audio, np.random.default_rng(0), length=sd.CLIP_SAMPLES, max_shift=0) * 0.8


def test_synthesizer_returns_real_speech(cache_dir: Path) -> None:
    yes = synth_word("yes", voice="en-us+m3", rate=170, pitch=50, cache_dir=cache_dir)
    no = synth_word("no", voice="en-us+m3", rate=170, pitch=50, cache_dir=cache_dir)
    assert yes.dtype == np.float32 and 0.15 * 16_000 < yes.size < 1.2 * 16_000
    assert np.sqrt(np.mean(yes**2)) > 0.02 and np.abs(yes).max() <= 1.0
    # Speech energy sits mostly in the voice band, unlike white noise or a click.
    spectrum = np.abs(np.fft.rfft(yes)) ** 2
    freqs = np.fft.rfftfreq(yes.size, 1 / 16_000)
    assert spectrum[(freqs > 80) & (freqs < 4000)].sum() > 0.7 * spectrum.sum()
    assert yes.size != no.size or not np.allclose(yes, no)
    cached = list(cache_dir.rglob("yes-r170-p50.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(synth_word("yes", voice="en-us+m3", rate=170, pitch=50, cache_dir=cache_dir), yes)


def test_voices_and_pitches_change_the_audio(cache_dir: Path) -> None:
    base = synth_word("stop", voice="en-us+m3", rate=170, pitch=50, cache_dir=None)
    other_voice = synth_word("stop", voice="en-gb-scotland+f4", rate=170, pitch=50, cache_dir=None)
    slower = synth_word("stop", voice="en-us+m3", rate=120, pitch=50, cache_dir=None)
    assert slower.size > base.size * 1.15
    assert other_voice.size != base.size or not np.allclose(other_voice, base)


@pytest.mark.parametrize("voice,needle", [("en-us+nosuchvariant", "variant"), ("xx-nowhere+m3", "language")])
def test_unknown_voice_is_a_clear_error(voice: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        synth_word("yes", voice=voice, rate=170, pitch=50)
    with pytest.raises(ValueError, match="rate"):
        ESpeak.get().synthesize("yes", voice="en-us", rate=5, pitch=50)


def test_held_out_voices_never_train() -> None:
    cfg = speech.SYNTH["default"]
    assert not set(cfg.voices("train")) & set(cfg.voices("test"))
    for voice in cfg.voices("train") + cfg.voices("test"):
        ESpeak.get().check_voice(voice)  # every configured voice exists in the bundled data
    with pytest.raises(ValueError, match="held out"):
        sd.SynthConfig(dialects=("en",), train_variants=("m1", "m3"), test_variants=("m3",))


def test_frontend_matches_numpy_reference(cache_dir: Path) -> None:
    rng = np.random.default_rng(1)
    clips = np.stack([_spoken("left", cache_dir), 0.1 * rng.standard_normal(16_000).astype(np.float32)])
    clips = np.clip(clips + 0.01 * rng.standard_normal(clips.shape).astype(np.float32), -1, 1)
    with torch.no_grad():
        ours = LogMel()(torch.from_numpy(clips)).numpy()
    reference = log_mel_reference(clips)
    assert ours.shape == reference.shape == (2, 16_000 // 320 + 1, 40)
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=1e-4)


def test_frontend_matches_torch_stft(cache_dir: Path) -> None:
    """Independent path: torch.stft (centred, zero padded) with the same window and filterbank."""
    from models.speech_frontend import HOP, N_FFT

    wave = torch.from_numpy(np.stack([_spoken("go", cache_dir)[:12_345]]))
    spec = torch.stft(wave, n_fft=N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=True,
                      pad_mode="constant", return_complex=True).abs() ** 2
    expected = torch.log(spec.transpose(1, 2) @ torch.from_numpy(mel_filterbank()) + 1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(LogMel()(wave).numpy(), expected.numpy(), atol=2e-3, rtol=1e-4)


def test_exported_frontend_runs_in_onnxruntime(tmp_path: Path, cache_dir: Path) -> None:
    frontend = LogMel().eval()
    clips = np.stack([_spoken("yes", cache_dir), _spoken("no", cache_dir), _spoken("off", cache_dir)])
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("samples", min=512, max=96_000)}
    path = export_onnx(frontend, (torch.from_numpy(clips),), tmp_path / "frontend.onnx", input_names=["waveform"],
                       output_names=["logmel"], dynamic_shapes={"waveform": dims})
    session = ort_session(path)
    for length in (16_000, 12_000, 7_777):
        got = session.run(None, {"waveform": np.ascontiguousarray(clips[:, :length])})[0]
        np.testing.assert_allclose(got, log_mel_reference(clips[:, :length]), atol=2e-3, rtol=1e-4)


def test_mel_filterbank_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(fmin=100.0, fmax=9_000.0)
    with pytest.raises(ValueError, match="no FFT bin"):
        mel_filterbank(n_mels=200, n_fft=128)


def test_export_parity_detects_drift(tmp_path: Path, cache_dir: Path) -> None:
    """Untrained model: ORT matches PyTorch at two lengths, and a changed weight is caught."""
    torch.manual_seed(0)
    model = speech.KeywordSpotter(channels=8, blocks=1).eval()
    clips = np.stack([_spoken(w, cache_dir) for w in ("yes", "no", "up", "down")] * 5)
    parity = speech_export.export_and_check(model, clips, onnx_path=tmp_path / "m.onnx")
    assert [c[0] for c in parity["cases"]] == [[1, 16_000], [3, 16_000], [17, 16_000],
                                              [1, 12_000], [3, 12_000], [17, 12_000]]
    assert parity["max_abs_diff"] <= parity["atol"]
    with torch.no_grad():
        model.head.bias[3] += 1.0
    with pytest.raises(ParityError):
        parity_check(model, tmp_path / "m.onnx", [(clips[:3],)], atol=1e-4, rtol=1e-3)


def test_compose_is_balanced_and_in_range(cache_dir: Path) -> None:
    utts = [sd.Utterance(synth_word(w, voice=v, rate=170, pitch=50, cache_dir=cache_dir),
                         sd.LABELS.index(w) if w in sd.KEYWORDS else sd.LABELS.index(sd.UNKNOWN), w)
            for w in (*sd.KEYWORDS, "bed", "bird", "cat") for v in ("en-us+m1", "en+f2")]
    bank = sd.noise_bank(np.random.default_rng(0), count=2, seconds=1.5)
    clips, labels = sd.compose(utts, np.random.default_rng(0), noise=bank, aug=sd.Augment())
    assert clips.shape == (len(labels), 16_000) and clips.dtype == np.float32
    assert np.bincount(labels, minlength=12).tolist() == [4] + [2] * 11  # _silence_: 2 noises + 2 transients
    assert np.abs(clips).max() <= 1.0
    speechy = clips[labels >= 2]
    assert np.all(np.sqrt(np.mean(speechy**2, axis=1)) > 1e-3)


def test_place_crops_and_shifts() -> None:
    rng = np.random.default_rng(0)
    long = np.ones(20_000, dtype=np.float32)
    assert sd.place(long, rng, length=16_000, max_shift=0).sum() == 16_000
    short = np.ones(100, dtype=np.float32)
    assert sd.place(short, rng, length=1_000, max_shift=0).sum() == 100


def test_published_tiny_model(speech_repo: Path, cache_dir: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    model_dir = speech_repo / "speech"
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.input[0].name == "waveform" and list(config.input[0].dims) == [-1]
    assert (model_dir / "labels.txt").read_text().split() == list(sd.LABELS)
    card = json.loads((model_dir / "metrics.json").read_text())
    assert card["family"] == "speech" and card["input_spec"]["sample_rate"] == 16_000
    assert 0.0 <= card["metrics"]["accuracy"] <= 1.0
    assert {tuple(c[0]) for c in card["parity"]["cases"]} >= {(17, 16_000), (17, 12_000)}
    assert not set(card["train_voices"]) & set(card["test_voices"])
    session = ort_session(model_dir / "1" / "model.onnx")
    for length in (16_000, 12_000, 20_000, 300, 1):
        batch = np.stack([_spoken("yes", cache_dir), _spoken("stop", cache_dir)])[:, :length]
        if length > 16_000:
            batch = np.pad(batch, ((0, 0), (0, length - 16_000)))
        probs = session.run(None, {"waveform": np.ascontiguousarray(batch, dtype=np.float32)})[0]
        assert probs.shape == (2, 12)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


VOICES = ("en-us+m1", "en+f2", "en-029+m4", "en-us+f4", "en-gb-x-rp+m6")


def _fake_speech_commands(root: Path, cache_dir: Path, *, words: tuple[str, ...] = ("yes", "no", "stop", "bed", "marvin"),
                          speakers: int = 4, test: tuple[int, ...] = (3,), validation: tuple[int, ...] = (2,)) -> None:
    """A miniature Speech Commands folder with synthesized words (one eSpeak voice per 'speaker')."""
    from scipy.io import wavfile

    test_files, val_files = [], []
    for word in words:
        (root / word).mkdir(parents=True)
        for i, voice in enumerate(VOICES[:speakers]):
            clip = (_spoken(word, cache_dir, voice=voice) * 32767).astype(np.int16)
            name = f"{word}/spk{i}_nohash_0.wav"
            wavfile.write(root / name, 16_000, clip)
            (test_files if i in test else val_files if i in validation else []).append(name)
    (root / "testing_list.txt").write_text("\n".join(test_files) + "\n")
    (root / "validation_list.txt").write_text("\n".join(val_files) + "\n")
    (root / "_background_noise_").mkdir()
    noise = (0.1 * np.random.default_rng(0).standard_normal(48_000) * 32767).astype(np.int16)
    wavfile.write(root / "_background_noise_" / "white.wav", 16_000, noise)


def test_speech_commands_loader(tmp_path: Path, cache_dir: Path) -> None:
    _fake_speech_commands(tmp_path / "sc", cache_dir)
    from scipy.io import wavfile

    wavfile.write(tmp_path / "sc" / "yes" / "spk9_nohash_0.wav", 8_000, np.zeros(8_000, dtype=np.int16))
    corpus = speech_commands.load(tmp_path / "sc", seed=0, progress=False)
    assert len(corpus.test) == 5 and len(corpus.train) == 5 * 2 + 1  # validation clips are not trained on
    assert {u.source for u in corpus.test} == {f"{w}/spk3_nohash_0.wav" for w in ("yes", "no", "stop", "bed", "marvin")}
    labels = {u.source.split("/")[0]: sd.LABELS[u.label] for u in corpus.train}
    assert labels == {"yes": "yes", "no": "no", "stop": "stop", "bed": "_unknown_", "marvin": "_unknown_"}
    resampled = next(u for u in corpus.train if u.source == "yes/spk9_nohash_0.wav")
    assert resampled.audio.size == 16_000  # 8 kHz file resampled to 16 kHz
    assert len(corpus.train_noise[0]) == 32_000 and len(corpus.test_noise[0]) == 16_000
    (tmp_path / "sc" / "testing_list.txt").unlink()
    with pytest.raises(ValueError, match=r"testing_list\.txt"):
        speech_commands.load(tmp_path / "sc", seed=0, progress=False)
    with pytest.raises(ValueError, match="not a folder"):
        speech_commands.load(tmp_path / "missing", seed=0, progress=False)


def test_build_on_speech_commands_layout(tmp_path: Path, cache_dir: Path) -> None:
    """The real-data path end to end: load, train, evaluate on testing_list.txt, export, publish."""
    _fake_speech_commands(tmp_path / "sc", cache_dir, words=(*sd.KEYWORDS, "bed", "marvin"), speakers=5,
                          test=(3, 4), validation=(2,))
    code = speech.main(["--profile", "tiny", "--data", f"speech_commands:{tmp_path / 'sc'}", "--epochs", "1",
                        "--model-repository", str(tmp_path / "repo"), "--work-dir", str(tmp_path / "work")])
    assert code == 0
    card = json.loads((tmp_path / "repo" / "speech" / "metrics.json").read_text())
    assert "testing_list.txt" in card["split"] and card["metrics"]["test_clips"] == 24  # 20 + 2 unknown + 2 silence
    assert card["parity"]["max_abs_diff"] <= card["parity"]["atol"]
    assert "testing_list.txt" in (tmp_path / "repo" / "speech" / "MODEL_CARD.md").read_text()


def test_bad_data_spec_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="speech_commands:PATH"):
        speech.load_corpus("librispeech", profile="tiny", seed=0, cache_dir=tmp_path)


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        speech.main(["--help"])
    assert exit_info.value.code == 0
    assert "--data" in capsys.readouterr().out


def test_served_speech_model_answers(speech_repo: Path, tmp_path: Path, cache_dir: Path,
                                     request: pytest.FixtureRequest) -> None:
    try:
        serve_repository = request.getfixturevalue("serve_repository")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py provides no serve_repository fixture")
    import tritonclient.http as httpclient

    repo = tmp_path / "repo"
    shutil.copytree(speech_repo / "speech", repo / "speech")
    batch = np.stack([_spoken("yes", cache_dir), _spoken("go", cache_dir)]).astype(np.float32)
    expected = ort_session(repo / "speech" / "1" / "model.onnx").run(None, {"waveform": batch})[0]
    with serve_repository(repo) as url:
        client = httpclient.InferenceServerClient(url)
        assert client.is_model_ready("speech")
        inp = httpclient.InferInput("waveform", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        result = client.infer("speech", [inp], outputs=[httpclient.InferRequestedOutput("probabilities")])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
