"""Streaming keyword spotting vs the whole-clip model, through a real server: held-out accuracy of both, how
often their labels agree, and per-chunk latency (client round trip and server compute) of `speech-stream`.

    python -m models.speech_stream --model-repository REPO      # once: derive speech-stream from speech
    python -m loadtests.speech_stream_check --model-repository REPO [--streams 16] [--clips N]

The held-out set is rebuilt as `modelserve build` composed it (the card's profile and seed; synthetic voices
never trained on; the eSpeak cache makes it quick). Each clip is one sequence of 100 ms chunks sent with
`sequence_id`/`sequence_start`/`sequence_end` by the gRPC aio client; `--streams` sequences run at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc.aio as grpcaio

from loadtests.serverproc import serve
from models import speech
from models import speech_data as sd
from models.speech_stream import CHUNK, from_onnx
from models.speech_stream import NAME as STREAM
from models.speech_stream import PARENT as WHOLE
from service.modelrepo.card import read_card


def held_out(repo: Path) -> tuple[np.ndarray, np.ndarray]:
    card = read_card(repo / WHOLE)
    if not str(card.get("data", "")).startswith("synthetic"):
        raise SystemExit(f"{repo / WHOLE} was not trained on the synthetic corpus; this check rebuilds that "
                         "held-out set only")
    profile, seed = card["profile"], card["seed"]
    corpus, aug = speech.load_corpus("synth", profile=profile, seed=seed, cache_dir=speech.default_cache_dir())
    return sd.compose(corpus.test, np.random.default_rng(seed + 10_007), noise=corpus.test_noise, aug=aug.for_test())


def _input(x: np.ndarray) -> list:
    inp = grpcaio.InferInput("waveform", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return [inp]


async def whole_clip(client: grpcaio.InferenceServerClient, clips: np.ndarray) -> np.ndarray:
    parts = [await client.infer(WHOLE, _input(clips[i:i + 64])) for i in range(0, len(clips), 64)]
    return np.concatenate([p.as_numpy("probabilities") for p in parts])


async def streamed(client: grpcaio.InferenceServerClient, clips: np.ndarray, *, streams: int,
                   first_id: int) -> tuple[np.ndarray, list[float]]:
    """Final scores of every clip streamed in 100 ms chunks, `streams` sequences at a time; chunk latencies."""
    final = np.zeros((len(clips), len(sd.LABELS)), np.float32)
    latencies: list[float] = []
    todo = iter(range(len(clips)))

    async def worker() -> None:
        for i in todo:
            parts = [clips[i][None, s:s + CHUNK] for s in range(0, clips.shape[1], CHUNK)]
            for step, part in enumerate(parts):
                t0 = time.perf_counter()
                r = await client.infer(STREAM, _input(part), sequence_id=first_id + i, sequence_start=step == 0,
                                       sequence_end=step == len(parts) - 1)
                latencies.append(time.perf_counter() - t0)
            final[i] = r.as_numpy("probabilities")[0]

    await asyncio.gather(*(worker() for _ in range(streams)))
    return final, latencies


def _ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)) * 1e3, 2) for q in (50, 90, 99)}


async def _counters(client: grpcaio.InferenceServerClient) -> tuple[int, int, int]:
    """(executions, requests, compute ns) of speech-stream so far."""
    stats = (await client.get_inference_statistics(STREAM, as_json=True))["model_stats"][0]
    compute = stats.get("inference_stats", {}).get("compute_infer", {})  # zero fields are left out of the JSON
    return int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0)), int(compute.get("ns", 0))


def _server(before: tuple[int, int, int], after: tuple[int, int, int]) -> dict[str, float]:
    executions, requests, ns = (a - b for a, b in zip(after, before))
    return {"executions": executions, "mean_batch": round(requests / max(executions, 1), 2),
            "compute_ms_per_execution": round(ns / max(executions, 1) / 1e6, 3)}


async def solo(client: grpcaio.InferenceServerClient, clips: np.ndarray) -> dict:
    """One sequence at a time; after each clip, the whole-clip model on the same clip (interleaved timings)."""
    chunk_s, whole_s = [], []
    before = await _counters(client)
    for i in range(len(clips)):
        chunk_s += (await streamed(client, clips[i:i + 1], streams=1, first_id=1 + i))[1]
        t0 = time.perf_counter()
        await client.infer(WHOLE, _input(clips[i:i + 1]))
        whole_s.append(time.perf_counter() - t0)
    return {"chunk_latency_ms": _ms(chunk_s), "whole_clip_latency_ms": _ms(whole_s),
            "server": _server(before, await _counters(client))}


async def check(grpc_url: str, clips: np.ndarray, labels: np.ndarray, *, streams: int) -> dict:
    client = grpcaio.InferenceServerClient(grpc_url)
    try:
        whole = await whole_clip(client, clips)
        one = await solo(client, clips[:30])
        before = await _counters(client)
        stream, busy = await streamed(client, clips, streams=streams, first_id=1_000_000)
        many = {"chunk_latency_ms": _ms(busy), "server": _server(before, await _counters(client))}
    finally:
        await client.close()
    return {
        "clips": len(clips), "chunk_samples": CHUNK,
        "accuracy_whole_clip": float((whole.argmax(1) == labels).mean()),
        "accuracy_streamed": float((stream.argmax(1) == labels).mean()),
        "labels_identical": int((whole.argmax(1) == stream.argmax(1)).sum()),
        "max_abs_diff": float(np.abs(whole - stream).max()),
        "one_stream": one, f"{streams}_streams": many,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def causal_mean_gap(repo: Path, clips: np.ndarray, labels: np.ndarray) -> dict:
    """What a layer-by-layer stream (constant state per chunk) would give up: the whole-clip network with its
    per-clip feature mean replaced by the running mean of the frames seen so far (the only causal stand-in),
    computed offline on the same weights. speech-stream itself is exact; this sizes the alternative."""
    model = from_onnx(repo / WHOLE / "1" / "model.onnx")

    def scores(feats: torch.Tensor) -> torch.Tensor:
        x = torch.relu(model.stem(feats[:, None]))
        for block in model.blocks:
            x = block(x)
        return torch.softmax(model.head(x.mean(dim=(2, 3))), dim=-1)

    whole, causal = [], []
    with torch.no_grad():
        for i in range(0, len(clips), 256):
            feats = model.frontend(torch.from_numpy(np.ascontiguousarray(clips[i:i + 256], dtype=np.float32)))
            seen = torch.arange(1, feats.shape[1] + 1, dtype=feats.dtype)
            running = feats.mean(dim=2).cumsum(dim=1) / seen  # mean of frames 0..t, all mel bands
            whole.append(scores(feats - feats.mean(dim=(1, 2), keepdim=True)).numpy())
            causal.append(scores(feats - running[:, :, None]).numpy())
    w, c = np.concatenate(whole).argmax(1), np.concatenate(causal).argmax(1)
    return {"accuracy_whole_clip": float((w == labels).mean()), "accuracy_running_mean": float((c == labels).mean()),
            "labels_identical": int((w == c).sum())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.speech_stream_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True, help="holds speech and speech-stream")
    parser.add_argument("--streams", type=int, default=16, help="sequences streamed at once (default 16)")
    parser.add_argument("--clips", type=int, default=0, help="use only the first N held-out clips (default: all)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.streams < 1:
        raise SystemExit(f"--streams {args.streams}: expected a positive number")
    for name in (WHOLE, STREAM):
        if not (args.model_repository / name / "config.pbtxt").is_file():
            raise SystemExit(f"{args.model_repository / name} is missing; run `python -m models.speech_stream "
                             f"--model-repository {args.model_repository}` after building speech")
    clips, labels = held_out(args.model_repository)
    if args.clips:
        clips, labels = clips[: args.clips], labels[: args.clips]
    with tempfile.TemporaryDirectory() as tmp, \
            serve(args.model_repository, log_path=Path(tmp) / "server.log", grpc=True) as server:
        assert server.grpc_url is not None
        result = asyncio.run(check(server.grpc_url, clips, labels, streams=args.streams))
    result["layer_by_layer_alternative"] = causal_mean_gap(args.model_repository, clips, labels)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
