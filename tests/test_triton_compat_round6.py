"""Triton compatibility, round 6: what tritonclient users call that rounds 4 and 5 left unchecked, each mismatch
found against Triton's docs and sources and shown here through a real server and the real clients
(docs/RELIABILITY.md "Triton compatibility, round 6")."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import queue
import subprocess
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO_ROOT, free_port, run_server, wait_until
from tests.onnx_builders import scale_model, write_config

# A batch forms only when 8 rows are queued or after 10 minutes: a lone request stays queued for the whole test.
HOLDING = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 600000000 }\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton_round6") / "repo"
    scale_model(repo / "good" / "1" / "model.onnx")
    scale_model(repo / "holding" / "1" / "model.onnx")
    write_config(repo / "holding", HOLDING)
    scale_model(repo / "unloaded" / "1" / "model.onnx")  # in the repository, never loaded (explicit mode)
    scale_model(repo / "levels" / "1" / "model.onnx")
    write_config(repo / "levels", "max_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 600000000 "
                 "priority_levels: 2 default_priority_level: 2 }\n")
    return repo


@pytest.fixture(scope="module")
def server(repo):
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--model-control-mode", "explicit", "--load-model", "good",
            "--load-model", "holding", "--load-model", "levels"]
    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}) as url:
        yield SimpleNamespace(url=url, grpc_url=f"127.0.0.1:{grpc_port}",
                              http=httpclient.InferenceServerClient(url),
                              grpc=grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))


def _input(module, rows: int = 1):
    tensor = module.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, 4), np.float32))
    return tensor


def _metric(url: str, name: str, model: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"http://{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if (sample.name in (name, f"{name}_total") and sample.labels.get("model") == model
                    and labels.items() <= sample.labels.items()):
                return sample.value
    raise AssertionError(f"{name} for {model!r} not exposed")


def _pending(server) -> float:
    return _metric(server.url, "nv_inference_pending_request_count", "holding")


# ---------------------------------------------------------------------------------------------- cancellation


def test_a_cancelled_grpc_request_stops_counting_as_pending(server):
    # Triton's request cancellation: a gRPC client's cancel releases its queued request. The pending gauge (what
    # the chart's autoscaling rules read) used to keep counting it until some later batch formed, here never.
    answers: queue.Queue = queue.Queue()
    call = server.grpc.async_infer("holding", [_input(grpcclient)],
                                   callback=lambda result, error: answers.put((result, error)))
    wait_until(lambda: _pending(server) == 1, timeout=30, what="the request queued")
    call.cancel()
    result, error = answers.get(timeout=30)
    assert result is None and isinstance(error, InferenceServerException)
    wait_until(lambda: _pending(server) == 0, timeout=30, what="the cancelled request leaving the queue")
    assert _metric(server.url, "nv_inference_request_failure", "holding", reason="CANCELED") >= 1
    # The queue still works: 8 rows form a batch at once.
    assert server.grpc.infer("holding", [_input(grpcclient, 8)]).as_numpy("y").tolist() == [[2.0] * 4] * 8


def test_a_stream_closed_with_its_requests_cancelled_leaves_nothing_pending(server):
    # tritonclient's stop_stream(cancel_requests=True) cancels the stream with requests still queued.
    answers: queue.Queue = queue.Queue()
    server.grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(3):
            server.grpc.async_stream_infer("holding", [_input(grpcclient)], request_id=str(i))
        wait_until(lambda: _pending(server) == 3, timeout=30, what="the stream's requests queued")
    finally:
        server.grpc.stop_stream(cancel_requests=True)
    wait_until(lambda: _pending(server) == 0, timeout=30, what="the cancelled stream's requests leaving the queue")


async def test_a_cancelled_grpc_aio_call_stops_counting_as_pending(server):
    async with grpcaio.InferenceServerClient(server.grpc_url) as client:
        call = asyncio.ensure_future(client.infer("holding", [_input(grpcaio)]))
        await asyncio.to_thread(wait_until, lambda: _pending(server) == 1, timeout=30, what="the request queued")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await asyncio.to_thread(wait_until, lambda: _pending(server) == 0, timeout=30, what="the request leaving")


# ---------------------------------------------------------------------------------------------- gRPC TLS


def _certificate(name: str, *, key, issuer: tuple | None = None, ca: bool = False) -> x509.Certificate:
    """A certificate for `name` (127.0.0.1 as its address), self-signed or signed by issuer (cert, key)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it (PEM files)."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("round6 CA", key=ca_key, ca=True)
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM)}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{who}_cert"] = _certificate(who, key=key, issuer=(ca, ca_key)).public_bytes(serialization.Encoding.PEM)
        files[f"{who}_key"] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
    paths = {}
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
        paths[name] = str(folder / f"{name}.pem")
    return SimpleNamespace(**paths)


def _tls_args(pki, grpc_port: int, *extra: str) -> list[str]:
    return ["--grpc-port", str(grpc_port), "--grpc-server-cert", pki.server_cert, "--grpc-server-key",
            pki.server_key, "--model-control-mode", "explicit", "--load-model", "good", *extra]


def _ssl_client(pki, port: int, *, client_cert: bool = False) -> grpcclient.InferenceServerClient:
    mutual = {"private_key": pki.client_key, "certificate_chain": pki.client_cert} if client_cert else {}
    return grpcclient.InferenceServerClient(f"127.0.0.1:{port}", ssl=True, root_certificates=pki.ca, **mutual)


@pytest.mark.parametrize("workers", [1, 2])
def test_grpc_use_ssl_serves_tritonclients_ssl_channel(repo, pki, workers):
    # Triton's --grpc-use-ssl: tritonclient.grpc(ssl=True, root_certificates=...) used to fail the handshake here
    # (the flags were unrecognized; the port spoke plaintext only). With --http-workers the front ends own it.
    grpc_port = free_port()
    args = _tls_args(pki, grpc_port, "--grpc-use-ssl", "true", "--http-workers", str(workers))
    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}):
        client = _ssl_client(pki, grpc_port)
        assert client.is_server_ready()
        assert client.infer("good", [_input(grpcclient, 2)]).as_numpy("y").tolist() == [[2.0] * 4] * 2
        # A plaintext client gets no answer: refused, or (front ends) left waiting; a plaintext port answers it in
        # milliseconds, so 3 s of waiting tells the two apart.
        with pytest.raises(InferenceServerException) as plain:
            grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_server_live(client_timeout=3)
        assert plain.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


async def test_grpc_use_ssl_mutual_requires_a_client_certificate(repo, pki):
    grpc_port = free_port()
    args = _tls_args(pki, grpc_port, "--grpc-use-ssl-mutual", "true", "--grpc-root-cert", pki.ca)
    with run_server(repo, extra_args=args, env={"MODELSERVE_WARMUP": "false"}):
        assert _ssl_client(pki, grpc_port, client_cert=True).is_server_live()
        with pytest.raises(InferenceServerException):
            _ssl_client(pki, grpc_port).is_server_live(client_timeout=10)
        async with grpcaio.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=pki.ca,
                                                 private_key=pki.client_key, certificate_chain=pki.client_cert) as aio:
            result = await aio.infer("good", [_input(grpcaio)])
            assert result.as_numpy("y").tolist() == [[2.0] * 4]


@pytest.mark.parametrize("flags,expected", [
    (["--grpc-use-ssl"], "--grpc-use-ssl needs --grpc-server-cert (a PEM file); got none"),
    (["--grpc-use-ssl-mutual=true", "--grpc-server-cert", "CERT", "--grpc-server-key", "KEY"],
     "--grpc-use-ssl-mutual needs --grpc-root-cert (a PEM file); got none"),
    (["--grpc-use-ssl=true", "--grpc-server-cert", "/nonexistent.pem", "--grpc-server-key", "KEY"],
     "--grpc-server-cert '/nonexistent.pem' is not a readable file"),
])
def test_grpc_ssl_flags_missing_a_file_stop_the_server_saying_which(repo, pki, flags, expected):
    flags = [pki.server_cert if f == "CERT" else pki.server_key if f == "KEY" else f for f in flags]
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-repository", str(repo), "--http-port",
           str(free_port()), "--grpc-port", str(free_port()), *flags]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and expected in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- model not loaded


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_model_not_loaded_answers_with_tritons_words(server, protocol):
    # qa/L0_lifecycle checks that the message starts with Triton's words ("... has no available versions").
    client, module = (server.http, httpclient) if protocol == "http" else (server.grpc, grpcclient)
    calls = {
        "infer": lambda: client.infer("unloaded", [_input(module)]),
        "metadata": lambda: client.get_model_metadata("unloaded"),
        "config": lambda: client.get_model_config("unloaded"),
        # Triton looks the model up for its statistics too: an error, where an empty list was answered
        "statistics": lambda: client.get_inference_statistics("unloaded"),
    }
    for what, call in calls.items():
        with pytest.raises(InferenceServerException) as failed:
            call()
        message = failed.value.message()
        assert message.startswith("Request for unknown model: 'unloaded' has no available versions"), (what, message)
        assert "UNAVAILABLE" in message  # then ours: the state and why
        assert failed.value.status() in ("503", "StatusCode.UNAVAILABLE")  # kept: retry while it loads
    with pytest.raises(InferenceServerException) as failed:
        client.get_model_metadata("unloaded", "1")
    assert failed.value.message().startswith("Request for unknown model: 'unloaded' version 1 is not at ready state")
    assert not client.is_model_ready("unloaded")


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_parameters_extension_is_claimed_and_custom_parameters_of_each_type_are_taken(server, protocol):
    client, module = (server.http, httpclient) if protocol == "http" else (server.grpc, grpcclient)
    metadata = client.get_server_metadata()
    extensions = metadata["extensions"] if protocol == "http" else list(metadata.extensions)
    assert "parameters" in extensions  # Triton lists it; its requests were always taken here
    custom = {"an_int": 2**40, "a_float": 1.5, "a_bool": False, "a_string": "x"}
    result = client.infer("good", [_input(module)], parameters=custom, priority=2, timeout=10**9)
    assert result.as_numpy("y").tolist() == [[2.0] * 4]


# ---------------------------------------------------------------------------------------------- schedule policy


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_more_urgent_priority_is_served_ahead_of_a_queued_request(server, protocol):
    # `levels` batches 2 rows, or waits 10 minutes. A 1-row request at the default level 2 waits; a 2-row one at
    # level 1 then goes first, as a batch of its own. Priorities were taken but did not reorder the queue: it
    # queued behind the first, which could not take it along (3 rows), so it waited the 10 minutes too.
    module = httpclient if protocol == "http" else grpcclient
    client = server.http if protocol == "http" else server.grpc
    answers: queue.Queue = queue.Queue()
    waiting = server.grpc.async_infer("levels", [_input(grpcclient)],  # priority 0: the default level (2)
                                      callback=lambda result, error: answers.put((result, error)))
    try:
        wait_until(lambda: _metric(server.url, "nv_inference_pending_request_count", "levels") == 1, timeout=30,
                   what="the level-2 request queued")
        urgent = client.infer("levels", [_input(module, 2)], priority=1,
                              **({"client_timeout": 60} if protocol == "grpc" else {}))
        assert urgent.as_numpy("y").tolist() == [[2.0] * 4] * 2
        assert answers.empty() and _metric(server.url, "nv_inference_pending_request_count", "levels") == 1
    finally:
        waiting.cancel()
    assert answers.get(timeout=30)[0] is None  # cancelled, never run
    wait_until(lambda: _metric(server.url, "nv_inference_pending_request_count", "levels") == 0, timeout=30,
               what="the queue emptied")


def test_schedule_policy_is_claimed_and_a_bad_priority_is_a_400(server):
    assert "schedule_policy" in server.http.get_server_metadata()["extensions"]
    answer = httpx.post(f"http://{server.url}/v2/models/levels/infer", timeout=30, json={
        "parameters": {"priority": "urgent"},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1] * 8}]})
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("parameter 'priority': expected an unsigned integer")
