"""GPU utilization sampled through NVML while a block runs (the GPU bench's "does the front end keep the
GPU busy"); without NVML (no nvidia-ml-py, no driver) the summary says so instead of giving numbers."""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

INTERVAL_S = 0.05  # NVML's utilization counter covers the last 1/6 s to 1 s depending on the board


def _nvml() -> ModuleType | None:
    try:
        # NOTE: optional (nvidia-ml-py, the `gpu` extra)
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no module, no driver, no GPU
        return None


def gpu_name(index: int = 0) -> str | None:
    nv = _nvml()
    if nv is None:
        return None
    name = nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(index))
    return name if isinstance(name, str) else name.decode()


class GpuSampler:
    """`with GpuSampler() as gpu: ...` then `gpu.summary()`: mean and max utilization (%), peak memory."""

    def __init__(self, index: int = 0) -> None:
        self._nv = _nvml()
        self._handle = self._nv.nvmlDeviceGetHandleByIndex(index) if self._nv is not None else None
        self._stop = threading.Event()
        self._util: list[int] = []
        self._mem: list[int] = []
        self._thread = threading.Thread(target=self._sample, name="gpu-sampler", daemon=True)

    def _sample(self) -> None:
        nv = self._nv
        assert nv is not None
        while not self._stop.wait(INTERVAL_S):
            self._util.append(nv.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._mem.append(nv.nvmlDeviceGetMemoryInfo(self._handle).used)

    def __enter__(self) -> GpuSampler:
        if self._nv is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self._util:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_peak_mb": None, "gpu_samples": 0}
        return {"gpu_util_mean": sum(self._util) / len(self._util), "gpu_util_max": max(self._util),
                "gpu_mem_peak_mb": max(self._mem) / 2**20, "gpu_samples": len(self._util)}
