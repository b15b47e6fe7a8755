"""ONNX Runtime I/O binding for one model instance: outputs land in buffers allocated once per instance
(page-locked host memory when the instance runs on CUDA), inputs are bound without ORT's per-run checks.

Why: on a GPU, `session.run` allocates every output on the host per call and copies device -> pageable
memory, which CUDA stages through a bounce buffer. Binding into pinned buffers lets the copies run at full
PCIe rate and saves the allocation. On CPU it changes nothing material; a setting turns it on there too
(MODELSERVE_IO_BINDING=on) so the path is exercised, and tested, on machines without a GPU.

One buffer per output, sized for max_batch_size rows: a batch of n rows binds its first n rows (a
contiguous prefix), so every batch-size bucket shares it. Outputs whose non-batch dims are dynamic, or
strings, are left to ORT to allocate.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from functools import cache
from math import prod

import numpy as np
import onnxruntime as ort

from service.datatypes import V2_TO_NUMPY
from service.modelrepo.accelerators import GPU_PROVIDER_NAMES
from service.modelrepo.config import GraphTensor

log = logging.getLogger("modelserve.iobinding")

_CUDA_HOST_ALLOC_PORTABLE = 1  # cudaHostAllocPortable: pinned for every CUDA context, not only the current one


@cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime ONNX Runtime's CUDA provider already loaded; None without one.

    NOTE: ctypes rather than cupy/torch: ORT has no Python API for pinned host memory, and the runtime is
    already in the process (onnxruntime-gpu loads it), so two C calls need no extra dependency.
    """
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaFreeHost.argtypes = [ctypes.c_void_p]
        return lib
    return None


class PinnedBuffer:
    """Page-locked host memory seen as a numpy array; freed when the buffer object goes."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        lib = _cudart()
        if lib is None:
            raise OSError("no CUDA runtime (libcudart) in this process")
        nbytes = max(1, prod(shape) * dtype.itemsize)
        ptr = ctypes.c_void_p()
        status = lib.cudaHostAlloc(ctypes.byref(ptr), nbytes, _CUDA_HOST_ALLOC_PORTABLE)
        if status != 0 or not ptr.value:
            raise OSError(f"cudaHostAlloc of {nbytes} bytes failed with CUDA error {status}")
        self._lib, self._ptr = lib, ptr
        raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))
        self.array = raw[:prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    def __del__(self) -> None:
        ptr = getattr(self, "_ptr", None)
        if ptr is not None and ptr.value:
            self._lib.cudaFreeHost(ptr)
            ptr.value = None


def on_gpu(session: ort.InferenceSession) -> bool:
    return session.get_providers()[0] in GPU_PROVIDER_NAMES


def _allocate(shape: tuple[int, ...], dtype: np.dtype, *, pinned: bool) -> tuple[np.ndarray, object]:
    """(array, owner): pinned when asked and possible, else ordinary numpy memory."""
    if pinned:
        try:
            buffer = PinnedBuffer(shape, dtype)
            return buffer.array, buffer
        except OSError as exc:
            log.warning("pinned host buffer unavailable (%s); using pageable memory", exc)
    array = np.empty(shape, dtype=dtype)
    return array, array


def _static_shape(t: GraphTensor, *, rows: int, batched: bool) -> tuple[int, ...] | None:
    """The buffer shape for a tensor at `rows` rows; None when a non-batch dim is dynamic or it is BYTES."""
    dims = t.shape[1:] if batched else t.shape
    if t.datatype == "BYTES" or any(d is None for d in dims) or (batched and not t.shape):
        return None
    static = [int(d) for d in dims if d is not None]
    return tuple([rows, *static] if batched else static)


class BoundRunner:
    """Runs one session through an IOBinding with preallocated per-instance buffers; one caller at a time
    (the InstancePool lends a session and its runner together)."""

    def __init__(self, session: ort.InferenceSession, *, inputs: Sequence[GraphTensor],
                 outputs: Sequence[GraphTensor], max_rows: int, pinned: bool | None = None) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.batched = max_rows > 0
        self.max_rows = max(1, max_rows)
        self.pinned = on_gpu(session) if pinned is None else pinned
        self._owners: list[object] = []  # keeps pinned memory alive as long as the runner
        self.out_buffers = self._buffers(outputs)
        # Inputs are staged only on CUDA: there the host -> device copy is what pinned memory speeds up.
        self.in_buffers = self._buffers(inputs) if self.pinned else {}

    def _buffers(self, tensors: Sequence[GraphTensor]) -> dict[str, np.ndarray]:
        buffers = {}
        for t in tensors:
            shape = _static_shape(t, rows=self.max_rows, batched=self.batched)
            if shape is not None:
                array, owner = _allocate(shape, np.dtype(V2_TO_NUMPY[t.datatype]), pinned=self.pinned)
                buffers[t.name] = array
                self._owners.append(owner)
        return buffers

    def _window(self, buffers: dict[str, np.ndarray], name: str, *, rows: int, shape: tuple[int, ...],
                dtype: np.dtype) -> np.ndarray | None:
        """The leading `rows` rows of a buffer when they fit `shape` and `dtype` exactly, else None."""
        buf = buffers.get(name)
        if buf is None or buf.dtype != dtype or (self.batched and rows > buf.shape[0]):
            return None
        view = buf[:rows] if self.batched else buf
        return view if view.shape == shape else None

    def _bind_inputs(self, feeds: dict[str, np.ndarray], rows: int) -> None:
        for name, arr in feeds.items():
            staged = self._window(self.in_buffers, name, rows=rows, shape=arr.shape, dtype=arr.dtype)
            if staged is None:
                self.binding.bind_cpu_input(name, np.ascontiguousarray(arr))
                continue
            np.copyto(staged, arr)
            self.binding.bind_input(name, "cpu", 0, staged.dtype, list(staged.shape), staged.ctypes.data)

    def _bind_outputs(self, names: Sequence[str], rows: int) -> dict[str, np.ndarray]:
        bound = {}
        for name in names:
            buf = self.out_buffers.get(name)
            view = None
            if buf is not None:
                shape = (rows, *buf.shape[1:]) if self.batched else buf.shape
                view = self._window(self.out_buffers, name, rows=rows, shape=shape, dtype=buf.dtype)
            if view is None:
                self.binding.bind_output(name, "cpu")
            else:
                self.binding.bind_output(name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)
                bound[name] = view
        return bound

    def run(self, feeds: dict[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        """session.run's contract: arrays for `names`, in order. Results are copies: the buffers are reused."""
        rows = next(iter(feeds.values())).shape[0] if self.batched and feeds else 1
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._bind_inputs(feeds, rows)
        bound = self._bind_outputs(names, rows)
        self.session.run_with_iobinding(self.binding)
        if self.pinned:
            self.binding.synchronize_outputs()
        values = self.binding.get_outputs()
        return [bound[name].copy() if name in bound else value.numpy() for name, value in zip(names, values)]
