"""Triton's nv_gpu_* metrics from NVML, checked on CPU with a fake `pynvml` module in its place: names,
help, types, gpu_uuid labels, units (NVML's milliwatts and millijoules -> watts and joules)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from loadtests.gpu_sampler import GpuSampler, gpu_name
from service.metrics import Metrics, exposition
from tests.conftest import wait_until
from tests.inprocess import inprocess_server
from tests.onnx_builders import scale_model


class _NVMLError(Exception):
    pass


def fake_nvml(*, energy_mj: list[float]) -> types.ModuleType:
    """Two GPUs; the second reports no power or energy (NVML raises, as on boards without the sensor)."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = _NVMLError
    nv.nvmlInit = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUUID = lambda h: [b"GPU-aaaa", "GPU-bbbb"][h]  # bytes in old nvidia-ml-py, str in new
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=[1024, 2048][h], total=[8192, 16384][h])
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=[37, 0][h])

    def sensor(value):
        def read(h):
            if h == 1:
                raise _NVMLError("Not Supported")
            return value() if callable(value) else value
        return read

    nv.nvmlDeviceGetPowerUsage = sensor(123456)  # mW
    nv.nvmlDeviceGetPowerManagementLimit = sensor(300000)
    nv.nvmlDeviceGetTotalEnergyConsumption = sensor(lambda: energy_mj.pop(0))
    return nv


def test_gpu_metrics_exposition_with_triton_names(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=[5_000_000.0, 5_002_500.0]))
    text = exposition(Metrics(lambda: []).registry).decode()
    for line in (
        "# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)",
        "# TYPE nv_gpu_utilization gauge",
        'nv_gpu_utilization{gpu_uuid="GPU-aaaa"} 0.37',
        'nv_gpu_utilization{gpu_uuid="GPU-bbbb"} 0.0',
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-bbbb"} 2048.0',
        'nv_gpu_memory_total_bytes{gpu_uuid="GPU-aaaa"} 8192.0',
        "# HELP nv_gpu_power_usage GPU power usage in watts",
        "# TYPE nv_gpu_power_usage gauge",
        'nv_gpu_power_usage{gpu_uuid="GPU-aaaa"} 123.456',
        'nv_gpu_power_limit{gpu_uuid="GPU-aaaa"} 300.0',
        "# TYPE nv_energy_consumption counter",
        'nv_energy_consumption{gpu_uuid="GPU-aaaa"} 2.5',  # joules since start, not NVML's since boot
    ):
        assert line in text.splitlines(), f"missing {line!r} in:\n{text}"
    # No sensor: no sample (never a made-up 0 W).
    assert 'nv_gpu_power_usage{gpu_uuid="GPU-bbbb"}' not in text
    assert 'nv_energy_consumption{gpu_uuid="GPU-bbbb"}' not in text


def test_no_nvml_means_no_gpu_families(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as when nvidia-ml-py is missing
    assert "nv_gpu_" not in exposition(Metrics(lambda: []).registry).decode()


async def test_server_metrics_route_carries_gpu_metrics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=[1000.0, 1000.0, 4000.0]))
    repo = tmp_path / "models"
    scale_model(repo / "m" / "1" / "model.onnx")
    async with inprocess_server(repo) as (_, client):
        resp = await client.get("/metrics")
        assert resp.status_code == 200
        lines = resp.text.splitlines()
        assert 'nv_gpu_power_usage{gpu_uuid="GPU-aaaa"} 123.456' in lines
        assert 'nv_energy_consumption{gpu_uuid="GPU-aaaa"} 0.0' in lines
        assert 'nv_inference_request_success{model="m",version="1"} 0.0' in lines


def test_bench_sampler_reads_utilization_during_a_block(monkeypatch) -> None:
    nv = fake_nvml(energy_mj=[])
    nv.nvmlDeviceGetName = lambda h: "Fake H100"
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert gpu_name() == "Fake H100"
    with GpuSampler() as gpu:
        wait_until(lambda: gpu.summary()["gpu_samples"] >= 2, what="two NVML samples")
    summary = gpu.summary()
    assert summary["gpu_util_mean"] == 37 and summary["gpu_util_max"] == 37
    assert summary["gpu_mem_peak_mb"] == 1024 / 2**20
