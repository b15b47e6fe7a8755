"""Triton's system shared memory extension: regions a client registers under /dev/shm, read and written by the
tensor codecs instead of carrying tensor bytes on the wire.

The registry is owned by the InferenceCore; both wire codecs resolve an input's or requested output's
`shared_memory_region` / `shared_memory_byte_size` / `shared_memory_offset` parameters into a `ShmRef`
(bounds-checked against the registered region) while decoding, so a bad reference is a 400 before any compute.
Inputs are copied out of the region; outputs are written into it by the transport's encoder.

Only POSIX shared memory objects are accepted: the key is a plain name (as shm_open takes it, with or without
its leading "/"), opened as /dev/shm/<name> without following links, so a client cannot make the server map
an arbitrary file.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.errors import InvalidInput, ServingError

SHM_DIR = Path("/dev/shm")
_KEY = re.compile(r"^/?(?P<name>[A-Za-z0-9_.-]{1,255})$")
REGION_PARAM, SIZE_PARAM, OFFSET_PARAM = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"
CUDA_UNSUPPORTED = ("CUDA shared memory is not supported on this server (it runs models with ONNX Runtime on "
                    "host memory); use system shared memory (v2/systemsharedmemory) or send tensors in the request")


def cuda_register_refused(name: str) -> str:
    """Triton's words when built without GPU support (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT), then why."""
    return f"failed to register CUDA shared memory region: '{name}', GPUs not supported: {CUDA_UNSUPPORTED}"


def cuda_region_missing(name: str) -> str:
    return f"Unable to find cuda shared memory region: '{name}'; none can be registered: {CUDA_UNSUPPORTED}"


class AlreadyExists(ServingError):
    status_code = 409


class Region:
    """One registered region: a window [offset, offset + byte_size) of a /dev/shm object, kept open.

    NOTE: read and written with pread/pwrite, not through an mmap: the client owns the object and may shrink
    it (ftruncate) at any time, and touching a mapping past the object's end is SIGBUS, which killed the
    server with every request in flight. pread past the end returns short, a clear 400 instead.
    """

    def __init__(self, *, name: str, key: str, offset: int, byte_size: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self._fd: int | None = _open(key, offset=offset, byte_size=byte_size)
        self._lock = threading.Lock()  # close() never frees the fd number while a read or write uses it

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def _gone(self) -> InvalidInput:
        return InvalidInput(f"shared memory region '{self.name}' was unregistered during the request")

    def _shrunk(self, size: int) -> InvalidInput:
        return InvalidInput(f"shared memory region '{self.name}': its object '{self.key}' is now {size} bytes, "
                            f"smaller than the registered offset {self.offset} + byte_size {self.byte_size}; "
                            "keep the object's size while it is registered, or register it again")

    def read(self, start: int, size: int) -> bytes:
        with self._lock:
            if self._fd is None:
                raise self._gone()
            data = os.pread(self._fd, size, self.offset + start)
            if len(data) != size:
                raise self._shrunk(os.fstat(self._fd).st_size)
            return data

    def write(self, start: int, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                raise self._gone()
            size = os.fstat(self._fd).st_size
            if self.offset + start + len(data) > size:
                raise self._shrunk(size)
            os.pwrite(self._fd, data, self.offset + start)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _open(key: str, *, offset: int, byte_size: int) -> int:
    """The checked object's file descriptor (the caller closes it)."""
    match = _KEY.match(key)
    if match is None or match["name"] in (".", ".."):
        raise InvalidInput(f"failed to register shared memory region: invalid args: key {key!r} must be a POSIX "
                           "shared memory name such as '/input0' (letters, digits, '.', '_', '-')")
    path = SHM_DIR / match["name"]
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise InvalidInput(f"Unable to open shared memory region: '{key}': {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(f"Unable to open shared memory region: '{key}' is not a shared memory object")
        if offset < 0 or byte_size <= 0 or offset + byte_size > info.st_size:
            raise InvalidInput(
                f"failed to register shared memory region: invalid args: offset {offset} + byte_size {byte_size} "
                f"must lie inside the {info.st_size} bytes of '{key}' (byte_size > 0)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class ShmRef:
    """A tensor's place in a registered region, checked against its bounds."""

    region: Region
    offset: int
    byte_size: int

    def read(self) -> bytes:
        return self.region.read(self.offset, self.byte_size)

    def write(self, data: bytes, *, output: str) -> None:
        if len(data) > self.byte_size:
            raise InvalidInput(
                f"shared memory size specified with the request for output '{output}' ({self.byte_size} bytes) "
                f"should be at least {len(data)} bytes to hold the results"
            )
        self.region.write(self.offset, data)

    def parameters(self) -> dict[str, Any]:
        """The output's parameters in the response (its data is in the region, not on the wire)."""
        params: dict[str, Any] = {REGION_PARAM: self.region.name, SIZE_PARAM: self.byte_size}
        if self.offset:
            params[OFFSET_PARAM] = self.offset
        return params


class SharedMemoryRegistry:
    """Registered system shared memory regions by name; thread-safe (the gRPC and HTTP loops share it)."""

    def __init__(self, *, allowed: bool) -> None:
        self.allowed = allowed
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, *, name: str, key: str, offset: int, byte_size: int) -> None:
        if not self.allowed:
            raise InvalidInput("failed to register shared memory region: client shared memory is disabled on this "
                               "server; start it with --allow-client-shm true to use it")
        if not name:
            raise InvalidInput("failed to register shared memory region: invalid args: the region needs a name")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' already in manager; unregister it first")
            self._regions[name] = Region(name=name, key=key, offset=offset, byte_size=byte_size)

    def unregister(self, name: str | None = None) -> None:
        """Unregister one region (unknown names are a no-op, as in Triton) or, without a name, all."""
        with self._lock:
            names = [name] if name else list(self._regions)
            regions = [self._regions.pop(n) for n in names if n in self._regions]
        for region in regions:
            region.close()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if name:
                if name not in self._regions:
                    raise InvalidInput(f"Unable to find system shared memory region: '{name}'; registered: "
                                       f"{sorted(self._regions)}")
                return [self._regions[name].status()]
            return [r.status() for r in self._regions.values()]

    def ref(self, params: dict[str, Any], *, tensor: str) -> ShmRef | None:
        """The ShmRef an input's or output's parameters name, or None when it does not use shared memory."""
        if REGION_PARAM not in params and SIZE_PARAM not in params:
            return None
        name, size, offset = params.get(REGION_PARAM), params.get(SIZE_PARAM), params.get(OFFSET_PARAM, 0)
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool):
            raise InvalidInput(f"tensor '{tensor}': shared memory needs both '{REGION_PARAM}' (a string) and "
                               f"'{SIZE_PARAM}' (an integer)")
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise InvalidInput(f"tensor '{tensor}': '{OFFSET_PARAM}' must be an integer, got {offset!r}")
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"Unable to find shared memory region: '{name}' (tensor '{tensor}'); register it "
                               "first with v2/systemsharedmemory/region/<name>/register")
        if offset < 0 or offset >= region.byte_size:
            raise InvalidInput(f"Invalid offset for shared memory region: '{name}': offset {offset} is outside its "
                               f"{region.byte_size} bytes (tensor '{tensor}')")
        if size < 0 or offset + size > region.byte_size:
            raise InvalidInput(f"Invalid args for shared memory region: '{name}': offset {offset} + byte_size {size} "
                               f"exceeds its {region.byte_size} bytes (tensor '{tensor}')")
        return ShmRef(region, offset, size)

    def close(self) -> None:
        self.unregister()


def read_input(ref: ShmRef, *, name: str, expected: int | None) -> bytes:
    """An input's bytes from its region; `expected`: the byte size its shape and datatype need (None: BYTES)."""
    if expected is not None and ref.byte_size != expected:
        raise InvalidInput(f"unexpected total byte size {ref.byte_size} for input '{name}', expecting {expected}")
    return ref.read()
