"""speech-stream: the tiny zoo's keyword spotter fed 100 ms chunks through a real server with the real
tritonclient (gRPC stream with sequence parameters, HTTP), state carried by the server (implicit state).
Every streamed score must be the whole-clip `speech` model's score for the audio sent so far."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from loadtests import speech_stream_check
from models import speech, speech_stream
from models import speech_data as sd
from service.modelrepo.sessions import create_session
from tests.conftest import free_port, run_server
from tests.inprocess import inprocess_server

CHUNK = speech_stream.CHUNK
ATOL = 1e-4


@pytest.fixture(scope="module")
def repo(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the two speech models, so the server starts fast."""
    root = tmp_path_factory.mktemp("kws") / "models"
    for name in ("speech", "speech-stream"):
        shutil.copytree(tiny_zoo / name, root / name)
    return root


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The tiny build's held-out clips (voices never trained on), composed exactly as models.speech.build does."""
    corpus, aug = speech.load_corpus("synth", profile="tiny", seed=0, cache_dir=speech.default_cache_dir())
    return sd.compose(corpus.test, np.random.default_rng(10_007), noise=corpus.test_noise, aug=aug.for_test())


@pytest.fixture(scope="module")
def urls(repo: Path):
    grpc_port = free_port()
    with run_server(repo, extra_args=["--grpc-port", str(grpc_port)]) as url:
        yield url, f"127.0.0.1:{grpc_port}"


def _whole_clip(repo: Path, clips: list[np.ndarray]) -> np.ndarray:
    session = create_session(repo / "speech" / "1" / "model.onnx")
    return np.concatenate([session.run(None, {"waveform": c[None].astype(np.float32)})[0] for c in clips])


def _chunks(clip: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(clip[None, i:i + CHUNK], dtype=np.float32) for i in range(0, len(clip), CHUNK)]


def _inputs(module, chunk: np.ndarray) -> list:
    inp = module.InferInput("waveform", list(chunk.shape), "FP32")
    inp.set_data_from_numpy(chunk)
    return [inp]


def test_published_config_declares_sequence_batching_with_every_carried_tensor(repo: Path) -> None:
    config = text_format.Parse((repo / "speech-stream" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    sb = config.sequence_batching
    kinds = {c.name: model_config_pb2.ModelSequenceBatching.Control.Kind.Name(c.control[0].kind) for c in sb.control_input}
    assert kinds == {"START": "CONTROL_SEQUENCE_START", "END": "CONTROL_SEQUENCE_END",
                     "READY": "CONTROL_SEQUENCE_READY"}
    states = {s.input_name: (s.output_name, list(s.dims)) for s in sb.state}
    assert states == {"pending_audio_in": ("pending_audio_out", [512]), "counts_in": ("counts_out", [2]),
                      "log_mel_in": ("log_mel_out", [101, 40])}
    graph = create_session(repo / "speech-stream" / "1" / "model.onnx")
    assert {i.name for i in graph.get_inputs()} == {"waveform", *kinds, *states}
    assert {o.name for o in graph.get_outputs()} == {"probabilities", *(o for o, _ in states.values())}
    card = json.loads((repo / "speech-stream" / "metrics.json").read_text())
    assert (card["family"], card["variant"], card["parent"]) == ("speech", "stream", "speech")
    assert card["parity"]["max_abs_diff"] <= ATOL


async def test_grpc_stream_of_interleaved_sequences_ends_on_the_whole_clip_scores(urls, repo, held_out) -> None:
    """Every held-out clip is a sequence; all of them share one gRPC stream, their chunks interleaved."""
    clips, _ = held_out
    chunks = [_chunks(c) for c in clips]
    requests = [{"model_name": "speech-stream", "inputs": _inputs(grpcaio, parts[step]),
                 "request_id": f"{sid}/{step}", "sequence_id": sid + 1, "sequence_start": step == 0,
                 "sequence_end": step == len(parts) - 1}
                for step in range(max(map(len, chunks))) for sid, parts in enumerate(chunks) if step < len(parts)]
    client = grpcaio.InferenceServerClient(urls[1])

    async def gen():
        for r in requests:
            yield r

    got: dict[str, np.ndarray] = {}
    async for result, error in client.stream_infer(gen()):
        assert error is None, error
        got[result.get_response().id] = result.as_numpy("probabilities")[0]
        if len(got) == len(requests):
            break
    await client.close()
    final = np.stack([got[f"{sid}/{len(parts) - 1}"] for sid, parts in enumerate(chunks)])
    whole = _whole_clip(repo, list(clips))
    np.testing.assert_allclose(final, whole, atol=ATOL)
    assert (final.argmax(1) == whole.argmax(1)).all()
    # and each step answers for the audio so far, exactly as the whole-clip model on that prefix
    prefixes = _whole_clip(repo, [clips[0][:CHUNK * (step + 1)] for step in range(len(chunks[0]))])
    np.testing.assert_allclose(np.stack([got[f"0/{s}"] for s in range(len(chunks[0]))]), prefixes, atol=ATOL)


def test_http_sequences_match_the_served_whole_clip_model(urls, held_out) -> None:
    """The HTTP client with sequence parameters; the reference is the `speech` model served next to it."""
    clips, _ = held_out
    client = httpclient.InferenceServerClient(urls[0])
    short = clips[1][: 5 * CHUNK + 777]  # a last chunk shorter than 100 ms
    for sid, clip in enumerate([clips[0], short], start=100):
        parts = _chunks(clip)
        for step, part in enumerate(parts):
            result = client.infer("speech-stream", _inputs(httpclient, part), sequence_id=sid,
                                  sequence_start=step == 0, sequence_end=step == len(parts) - 1)
        whole = client.infer("speech", _inputs(httpclient, clip[None].astype(np.float32)))
        np.testing.assert_allclose(result.as_numpy("probabilities"), whole.as_numpy("probabilities"), atol=ATOL)
    client.close()


def test_state_is_per_sequence(urls, repo, held_out) -> None:
    """Two sequences alternate chunk by chunk; a third id is restarted mid-way: none sees another's audio."""
    clips, _ = held_out
    a, b = clips[2], clips[3]
    assert not np.allclose(a, b)
    client = httpclient.InferenceServerClient(urls[0])
    scores = {}
    for step, (pa, pb) in enumerate(zip(_chunks(a), _chunks(b))):
        last = step == len(_chunks(a)) - 1
        for sid, part in ((7, pa), (8, pb)):
            scores[sid] = client.infer("speech-stream", _inputs(httpclient, part), sequence_id=sid,
                                       sequence_start=step == 0, sequence_end=last).as_numpy("probabilities")[0]
    for step, part in enumerate(_chunks(a)[:4]):  # sequence 9 streams the start of a, then restarts on b
        client.infer("speech-stream", _inputs(httpclient, part), sequence_id=9, sequence_start=step == 0)
    for step, part in enumerate(_chunks(b)):
        scores[9] = client.infer("speech-stream", _inputs(httpclient, part), sequence_id=9, sequence_start=step == 0,
                                 sequence_end=step == len(_chunks(b)) - 1).as_numpy("probabilities")[0]
    client.close()
    whole = _whole_clip(repo, [a, b])
    np.testing.assert_allclose(scores[7], whole[0], atol=ATOL)
    np.testing.assert_allclose(scores[8], whole[1], atol=ATOL)
    np.testing.assert_allclose(scores[9], whole[1], atol=ATOL)
    assert not np.allclose(whole[0], whole[1], atol=ATOL)  # the clips score differently: a leak would show


def test_stream_graph_offline_equals_whole_clip_for_odd_chunkings(repo, held_out) -> None:
    """The graph alone (no server): chunks of 1 s, 777 and 1600 samples, clip lengths that end mid-hop."""
    clips, _ = held_out
    cases = [clips[4], clips[5][:12_345], clips[6][:300], clips[7][:1]]
    stream = create_session(repo / "speech-stream" / "1" / "model.onnx")
    whole = _whole_clip(repo, cases)
    for chunk in (CHUNK, 777, 16_000):
        np.testing.assert_allclose(speech_stream.stream_scores(stream, cases, chunk=chunk), whole, atol=ATOL)


async def test_task_endpoint_points_sequence_models_to_v2_infer(repo) -> None:
    async with inprocess_server(repo) as (_, client):
        r = await client.post("/v1/models/speech-stream/predict", json={"instances": [[0.0] * 100]})
    assert r.status_code == 400, r.text
    assert "sequence model" in r.json()["error"] and "sequence_id" in r.json()["error"]


def test_benchmark_command_reports_equal_accuracy(repo, tmp_path) -> None:
    """`python -m loadtests.speech_stream_check` (docs/BENCHMARKS.md) on a few tiny held-out clips."""
    out = tmp_path / "check.json"
    assert speech_stream_check.main(["--model-repository", str(repo), "--clips", "6", "--streams", "3",
                                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["clips"] == 6 and result["labels_identical"] == 6 and result["max_abs_diff"] <= ATOL
    assert result["accuracy_streamed"] == result["accuracy_whole_clip"]
    assert result["one_stream"]["server"]["executions"] > 0
    assert result["layer_by_layer_alternative"]["accuracy_whole_clip"] == result["accuracy_whole_clip"]
