"""Repository containment through a real server and the real tritonclient: names that would leave the
repository (`..`, `.`, `../x`, absolute paths, empty) are refused over HTTP and gRPC, nothing is loaded, and no
answer shows an absolute filesystem path."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, run_server
from tests.onnx_builders import scale_model

ESCAPES = ["..", ".", "../outside", "/etc", "sub/dir", ".hidden"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("contain")
    root = base / "repo"
    scale_model(root / "m" / "1" / "model.onnx")
    scale_model(base / "1" / "model.onnx")  # what "<repo>/.." would have served
    scale_model(base / "outside" / "1" / "model.onnx")  # what "../outside" would have served
    grpc_port = free_port()
    with run_server(root, extra_args=["--model-control-mode", "explicit", "--load-model", "m",
                                      "--grpc-port", str(grpc_port)]) as url:
        yield url, f"127.0.0.1:{grpc_port}", str(base)


@pytest.mark.parametrize("name", ESCAPES)
def test_http_load_refuses_names_outside_the_repository(server, name):
    url, _, base = server
    client = httpclient.InferenceServerClient(url)
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name)
    assert base not in str(info.value)
    assert [m["name"] for m in client.get_model_repository_index()] == ["m"]


@pytest.mark.parametrize("name", [*ESCAPES, ""])
def test_grpc_load_refuses_names_outside_the_repository(server, name):
    _, grpc_url, base = server
    client = grpcclient.InferenceServerClient(grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.load_model(name)
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")
    assert base not in info.value.message()
    assert [m.name for m in client.get_model_repository_index().models] == ["m"]
