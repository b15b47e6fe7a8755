"""KServe's own Python SDK (InferenceRESTClient, V1 and V2) against a real server: liveness over V1 (`GET /`),
readiness and model readiness over V2, and a V1 predict.

NOTE: the SDK pulls in ~70 packages (kubernetes, pandas, ...) whose pins would fight the project's, so it lives in
a virtualenv of its own, cached across sessions (tests/build_cache.py), and talks to the server from a subprocess.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.build_cache import VenvBuildError, cached_venv
from tests.conftest import run_server
from tests.onnx_builders import scale_model

KSERVE = "kserve==0.21.0"

SCRIPT = """
import asyncio, json, sys
from kserve import InferenceRESTClient, RESTConfig

async def main(base):
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    out = {
        "v1_live": await v1.is_server_live(base),
        "v2_live": await v2.is_server_live(base),
        "v2_ready": await v2.is_server_ready(base),
        "v2_model_ready": await v2.is_model_ready(base, "scale"),
    }
    await v1.close(); await v2.close()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    try:
        return cached_venv("kserve-sdk", requirements=[KSERVE], check="import kserve")
    except VenvBuildError as e:
        pytest.skip(f"the KServe SDK could not be installed here: {e}")


def test_kserve_sdk_sees_the_server_live_and_ready(kserve_python, tmp_path):
    root = tmp_path / "models"
    scale_model(root / "scale" / "1" / "model.onnx")
    with run_server(root) as url:
        done = subprocess.run([str(kserve_python), "-c", SCRIPT, f"http://{url}"], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"v1_live": True, "v2_live": True, "v2_ready": True, "v2_model_ready": True}
