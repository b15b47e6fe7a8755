"""Closed-loop async load: `concurrency` workers, each sending its next request when the last one answered.

aiohttp with one keep-alive connection per worker (the pool is sized to the concurrency), so we measure
inference, not TCP handshakes. Every response status is checked and every failure is counted by kind.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
from tqdm import tqdm

from loadtests.grpcload import close_channels, encode_grpc, open_channels, run_grpc_level
from loadtests.payloads import (
    EncodedRequest,
    ModelInfo,
    check_response,
    encode,
    model_info,
    npy_inputs,
    random_inputs,
    request_shapes,
)

# Distinct bodies cycled through, so a server-side cache or branch predictor cannot learn one payload.
DISTINCT_BODIES = 8
MAX_ERROR_SAMPLES = 5


def base_url(url: str) -> str:
    """'127.0.0.1:8000' (tritonclient's form) or 'http://host:port' -> 'http://host:port'."""
    url = url.rstrip("/")
    return url if "://" in url else f"http://{url}"


@dataclass
class Target:
    """Where requests go: server base URL, model and (optionally) version."""

    url: str
    model: str
    version: str | None = None
    grpc_url: str | None = None  # "host:port" of the gRPC endpoint, for protocol "grpc"

    def model_path(self) -> str:
        version = f"/versions/{self.version}" if self.version else ""
        return f"{base_url(self.url)}/v2/models/{self.model}{version}"


@dataclass
class LevelResult:
    """Raw outcome of one (protocol, concurrency) level; report.summarize turns it into numbers."""

    protocol: str
    concurrency: int
    rows_per_request: int
    requested: int
    ok: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    warmup_errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0
    probe_cpu_s: dict[str, float] = field(default_factory=dict)
    time_capped: bool = False
    stats_before: dict | None = None
    stats_after: dict | None = None

    def record_error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(f"{kind}: {detail}"[:300])


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {url} answered {resp.status}: {body[:300].decode(errors='replace')}")
        return orjson.loads(body)


async def fetch_model_info(session: aiohttp.ClientSession, target: Target) -> ModelInfo:
    metadata = await get_json(session, target.model_path())
    try:
        config = await get_json(session, target.model_path() + "/config")
    except RuntimeError:
        config = None  # a server without the config endpoint: model_info guesses batching from shapes
    return model_info(metadata, config)


async def fetch_stats(session: aiohttp.ClientSession, target: Target) -> dict | None:
    """The statistics extension's document, or None when the server does not offer it."""
    try:
        return await get_json(session, target.model_path() + "/stats")
    except RuntimeError:
        return None


async def _send(session: aiohttp.ClientSession, *, url: str, req: EncodedRequest, info: ModelInfo,
                result: LevelResult) -> None:
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=req.body, headers=req.headers) as resp:
            body = await resp.read()
            latency = time.perf_counter() - t0
            status, hlen = resp.status, resp.headers.get("Inference-Header-Content-Length")
    except asyncio.TimeoutError:
        result.record_error("timeout", f"no answer within the client timeout after {time.perf_counter() - t0:.2f} s")
        return
    except aiohttp.ClientError as exc:
        result.record_error(type(exc).__name__, str(exc))
        return
    if status != 200:
        result.record_error(f"HTTP {status}", body[:200].decode(errors="replace"))
        return
    problem = check_response(body, header_length=hlen, info=info, rows=req.rows)
    if problem is not None:
        result.record_error("bad response", problem)
        return
    result.ok += 1
    result.latencies_s.append(latency)


async def run_level(
    session: aiohttp.ClientSession,
    *,
    target: Target,
    info: ModelInfo,
    bodies: list[EncodedRequest],
    result: LevelResult,
    time_cap_s: float,
    progress: bool,
) -> None:
    """Send result.requested requests from result.concurrency workers, stopping early at the time cap."""
    url = target.model_path() + "/infer"
    loop = asyncio.get_running_loop()
    issued = 0
    deadline = loop.time() + time_cap_s
    bar = tqdm(total=result.requested, unit="req", leave=False, disable=not progress, mininterval=0.25,
               desc=f"{result.protocol} c={result.concurrency}")

    async def worker() -> None:
        nonlocal issued
        while issued < result.requested:
            if loop.time() >= deadline:
                result.time_capped = True
                return
            body = bodies[issued % len(bodies)]
            issued += 1
            await _send(session, url=url, req=body, info=info, result=result)
            bar.update(1)

    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(result.concurrency)))
    finally:
        result.elapsed_s = time.perf_counter() - t0
        result.client_cpu_s = time.process_time() - cpu0
        bar.close()


@dataclass
class LoadConfig:
    """What to send and how hard; one LoadConfig drives every (protocol, concurrency) level."""

    target: Target
    protocols: list[str]
    concurrencies: list[int]
    requests: int
    batch: int = 1
    time_cap_s: float = 60.0
    timeout_s: float = 30.0
    warmup: int = 0  # per level; 0 means max(2 * concurrency, 16): opens every pooled connection
    shape_overrides: dict[str, list[int]] = field(default_factory=dict)
    npy_files: dict[str, Path] = field(default_factory=dict)
    int_high: int = 10
    seed: int = 0
    progress: bool = True
    # name -> CPU seconds used so far (the bench reads /proc for the server and the whole machine): when
    # client, server and other jobs share the cores, these show how the cores were split during a level.
    cpu_probes: dict[str, Callable[[], float]] = field(default_factory=dict)


def build_bodies(info: ModelInfo, cfg: LoadConfig, *, protocol: str) -> list[EncodedRequest]:
    shapes = request_shapes(info, batch=cfg.batch, overrides=cfg.shape_overrides)

    def one(inputs: dict[str, np.ndarray]) -> EncodedRequest:
        if protocol == "grpc":
            return encode_grpc(inputs, info=info, model=cfg.target.model, version=cfg.target.version)
        return encode(inputs, info=info, protocol=protocol)

    if cfg.npy_files:
        return [one(npy_inputs(info, files=cfg.npy_files, shapes=shapes))]
    rng = np.random.default_rng(cfg.seed)  # same seed, same bodies: runs are comparable
    return [one(random_inputs(info, shapes=shapes, rng=rng, int_high=cfg.int_high)) for _ in range(DISTINCT_BODIES)]


async def _grpc_levels(cfg: LoadConfig, *, info: ModelInfo, warm: LevelResult, result: LevelResult,
                       bodies: list[EncodedRequest], session: aiohttp.ClientSession) -> None:
    """The warm-up and the measured level over gRPC, on the same channels (connections open before timing)."""
    if cfg.target.grpc_url is None:
        raise ValueError("protocol 'grpc' needs Target.grpc_url (the server's gRPC host:port)")
    channels = open_channels(cfg.target.grpc_url, result.concurrency)
    try:
        await run_grpc_level(channels, info=info, bodies=bodies, result=warm, time_cap_s=cfg.time_cap_s,
                             timeout_s=cfg.timeout_s)
        result.warmup_errors = warm.errors
        result.error_samples.extend(f"(warm-up) {s}" for s in warm.error_samples[:2])
        result.stats_before = await fetch_stats(session, cfg.target)
        start = {name: probe() for name, probe in cfg.cpu_probes.items()}
        await run_grpc_level(channels, info=info, bodies=bodies, result=result, time_cap_s=cfg.time_cap_s,
                             timeout_s=cfg.timeout_s)
        result.probe_cpu_s = {name: probe() - start[name] for name, probe in cfg.cpu_probes.items()}
        result.stats_after = await fetch_stats(session, cfg.target)
    finally:
        await close_channels(channels)


async def measure_level(cfg: LoadConfig, *, info: ModelInfo, protocol: str, concurrency: int,
                        bodies: list[EncodedRequest]) -> LevelResult:
    """One level on a fresh connection pool: warm-up (unmeasured), stats snapshot, run, stats snapshot."""
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        rows = bodies[0].rows
        warm = LevelResult(protocol=protocol, concurrency=concurrency, rows_per_request=rows,
                           requested=cfg.warmup or max(2 * concurrency, 16))
        if protocol == "grpc":
            result = LevelResult(protocol=protocol, concurrency=concurrency, rows_per_request=rows,
                                 requested=cfg.requests)
            await _grpc_levels(cfg, info=info, warm=warm, result=result, bodies=bodies, session=session)
            return result
        await run_level(session, target=cfg.target, info=info, bodies=bodies, result=warm,
                        time_cap_s=cfg.time_cap_s, progress=False)
        result = LevelResult(protocol=protocol, concurrency=concurrency, rows_per_request=rows,
                             requested=cfg.requests)
        # Warm-up failures are kept apart (so errors + ok == requests) but reported, never dropped.
        result.warmup_errors = warm.errors
        result.error_samples.extend(f"(warm-up) {s}" for s in warm.error_samples[:2])
        result.stats_before = await fetch_stats(session, cfg.target)
        start = {name: probe() for name, probe in cfg.cpu_probes.items()}
        await run_level(session, target=cfg.target, info=info, bodies=bodies, result=result,
                        time_cap_s=cfg.time_cap_s, progress=cfg.progress)
        result.probe_cpu_s = {name: probe() - start[name] for name, probe in cfg.cpu_probes.items()}
        result.stats_after = await fetch_stats(session, cfg.target)
    return result


async def run_load(cfg: LoadConfig) -> tuple[ModelInfo, list[LevelResult]]:
    """Every protocol at every concurrency, in order; statistics are snapshotted around each level."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as session:
        info = await fetch_model_info(session, cfg.target)
    results = []
    for protocol in cfg.protocols:
        bodies = build_bodies(info, cfg, protocol=protocol)
        for concurrency in cfg.concurrencies:
            results.append(await measure_level(cfg, info=info, protocol=protocol, concurrency=concurrency, bodies=bodies))
    return info, results


def run_sync(cfg: LoadConfig) -> tuple[ModelInfo, list[LevelResult]]:
    """run_load on uvloop when present: its lower per-request overhead leaves more CPU to a co-located server."""
    try:
        # NOTE: optional (uvicorn[standard] brings it on Linux only)
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_load(cfg))
