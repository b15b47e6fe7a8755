"""The one tensor codec: datatypes, shapes, element counts, the raw layout and BYTES, for every transport.

`protocol_v2` (HTTP JSON and the binary extension) and `protocol_grpc` (typed and raw contents) both build
their tensors here, so the checks cannot drift. Shapes are checked before anything is allocated.

Raw layout (the binary extension's tail and gRPC's raw_input_contents): fixed-size types are little-endian
C-order bytes; BYTES elements are each a 4-byte little-endian length followed by that many bytes. We write
this codec ourselves because tritonclient ships only the client side of it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import chain
from math import prod
from typing import Any

import numpy as np

from service.datatypes import V2_TO_NUMPY, numpy_dtype
from service.errors import InvalidInput, PayloadTooLarge

# Triton rejects JSON nested deeper than this; a deeper BYTES list would otherwise recurse without bound.
MAX_NESTING = 100
# No real tensor has a dimension this large; bigger ones only overflow numpy's size arithmetic.
MAX_DIM = 2**31 - 1
MAX_RANK = 32
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
# BYTES elements in one tensor. Each becomes a Python bytes object, decoded one by one on the event loop: 10^7
# one-byte strings (a 50 MB request) held every client for 60 s (2 loaded cores) before the model's batch size
# refused them. A million strings is far beyond any text batch and decodes in well under a second.
MAX_STRINGS = 2**20
_U32 = struct.Struct("<I").unpack_from


def check_shape(shape: object, *, name: str, datatype: str | None = None) -> list[int]:
    """A shape as a list of ints in [0, MAX_DIM]; InvalidInput naming the input otherwise. With `datatype`,
    also refuses a shape whose byte size overflows 64 bits (Triton's wording for both overflows)."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: shape has {len(shape)} dimensions; at most {MAX_RANK} are supported")
    for d in shape:
        if d < 0:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension; "
                               "expected non-negative integers")
    count = prod(shape)
    if count > INT64_MAX:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} causes total element count to exceed maximum "
                           f"size of {INT64_MAX}")
    if datatype in V2_TO_NUMPY and count * (1 if datatype == "BYTES" else numpy_dtype(datatype).itemsize) > UINT64_MAX:
        raise InvalidInput(f"byte size overflow for input {name!r}: shape {list(shape)} of {datatype}")
    # NumPy refuses a shape whose non-zero dimensions overflow its byte size even when a zero dimension makes the
    # tensor empty ([0, 2651, 1525715, 570094160] of FP32): refuse it here, as the client's error. (A non-empty
    # shape that large is refused later by check_byte_budget, as too large for a request: 413.)
    itemsize = numpy_dtype(datatype).itemsize if datatype in V2_TO_NUMPY and datatype != "BYTES" else 1
    if count == 0 and prod(d for d in shape if d) * itemsize > INT64_MAX:
        raise InvalidInput(f"byte size overflow for input {name!r}: shape {list(shape)}"
                           f"{f' of {datatype}' if datatype else ''}; its non-zero dimensions exceed {INT64_MAX} bytes")
    for d in shape:
        if d > MAX_DIM:
            raise InvalidInput(f"input {name!r}: dimension {d} of shape {list(shape)} exceeds {MAX_DIM}")
    return list(shape)


def element_count(shape: Sequence[int]) -> int:
    return prod(shape)


def check_byte_budget(shape: Sequence[int], *, name: str, datatype: str, limit: int) -> None:
    """Refuse a shape whose tensor would take more than `limit` bytes, before allocating it (a BYTES element
    counts one byte: no encoding carries one in less), or more than MAX_STRINGS BYTES elements."""
    if datatype == "BYTES":
        check_string_count(element_count(shape), name=name)
    itemsize = 1 if datatype == "BYTES" else numpy_dtype(datatype).itemsize
    need = element_count(shape) * itemsize
    if need > limit:
        raise PayloadTooLarge(f"input {name!r}: shape {list(shape)} of {datatype} needs {need} bytes, more than a "
                              f"request may carry ({limit} bytes, setting max_request_bytes)")


def check_string_count(n: int, *, name: str) -> None:
    if n > MAX_STRINGS:
        raise PayloadTooLarge(f"input {name!r}: {n} BYTES elements exceed the limit of {MAX_STRINGS} strings in one "
                              "tensor; send them in several requests")


def bytes_array(items: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(shape)


def _check_count(got: int, shape: Sequence[int], *, name: str, what: str) -> None:
    need = element_count(shape)
    if got != need:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {need} elements, {what} has {got}")


def _check_string_count(got: int, shape: Sequence[int], *, name: str, what: str) -> None:
    """As _check_count, with Triton's wording for strings first (its clients' tests look for it)."""
    need = element_count(shape)
    if got != need:
        raise InvalidInput(f"expected {need} strings for inference input {name!r}, got {got}: shape {list(shape)} "
                           f"needs {need} elements, {what} has {got}")


def check_element_count(got: int, shape: Sequence[int], *, name: str, datatype: str, what: str) -> None:
    """`got` elements for `shape` (Triton's wording for strings), checked before the values are made objects."""
    check = _check_string_count if datatype == "BYTES" else _check_count
    check(got, shape, name=name, what=what)


def from_raw(raw: memoryview | bytes, *, name: str, datatype: str, shape: list[int], model: str = "") -> np.ndarray:
    """An array from raw bytes (binary extension / gRPC raw contents), checked against shape and datatype.
    `model` only names the model in the byte-size message (Triton's wording, which its tests look for)."""
    n = element_count(shape)
    if datatype != "BYTES":
        dtype = numpy_dtype(datatype)
        if len(raw) != n * dtype.itemsize:
            for_model = f" for model {model!r}" if model else ""
            raise InvalidInput(
                f"input byte size mismatch for input {name!r}{for_model}. Expected {n * dtype.itemsize}, got "
                f"{len(raw)}: shape {shape} of {datatype} needs {n * dtype.itemsize} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    check_string_count(n, name=name)
    return bytes_array(_split_strings(raw if isinstance(raw, bytes) else bytes(raw), n=n, name=name, shape=shape),
                       shape)


def _split_strings(data: bytes, *, n: int, name: str, shape: list[int]) -> list[bytes]:
    """The BYTES elements of raw data (each a 4-byte little-endian length, then that many bytes), checked.
    One copy of the data, then slices of it: half the time of slicing a memoryview and copying each slice."""
    items: list[bytes] = []
    append, offset, size = items.append, 0, len(data)
    while offset < size:
        if len(items) >= n:
            raise InvalidInput(f"expected {n} strings for inference input {name!r}, got more: shape {shape} needs "
                               f"{n} BYTES elements; the data holds more")
        if offset + 4 > size:
            raise InvalidInput(f"input {name!r}: BYTES element {len(items)} is cut inside its 4-byte length prefix")
        start = offset + 4
        offset = start + _U32(data, offset)[0]
        if offset > size:
            raise InvalidInput(f"input {name!r}: BYTES element {len(items)} claims {offset - start} bytes past the "
                               "data's end")
        append(data[start:offset])
    _check_string_count(len(items), shape, name=name, what="the data")
    return items


def to_raw(arr: np.ndarray) -> bytes:
    """Raw bytes of a tensor as the binary extension and gRPC raw contents carry it."""
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        parts = []
        for item in arr.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr).tobytes()


def raw_view(arr: np.ndarray) -> bytes | memoryview:
    """As to_raw, without a copy where numpy can give the bytes (C-contiguous fixed-size data): a response
    carries the output array's own memory (a batch output's rows are already a view)."""
    if arr.dtype != object and arr.dtype.kind not in ("U", "S") and arr.flags.c_contiguous:
        return arr.data.cast("B") if arr.size else b""
    return to_raw(arr)


def _too_deep(name: str) -> str:
    return f"JSON nesting depth exceeds maximum allowed limit ({MAX_NESTING}) in the data of input {name!r}"


def _nesting(values: Any) -> int:
    """Depth of nested lists along the first elements (numpy needs a regular nesting, so that is the depth)."""
    depth = 0
    while isinstance(values, (list, tuple)):
        depth += 1
        values = values[0] if values else None
    return depth


def _flatten_bytes(data: list, *, name: str, most: int) -> list[bytes]:
    """Nested lists of strings (or numbers, sent as their text) -> flat list of bytes, depth-limited; stops
    once it holds more than the `most` the shape needs."""
    out: list[bytes] = []
    stack: list[tuple[Any, int]] = [(iter(data), 1)]
    while stack:
        if len(out) > most:
            raise InvalidInput(f"expected {most} strings for inference input {name!r}, got more: 'data' holds "
                               f"more than the {most} elements its shape needs")
        it, depth = stack[-1]
        item = next(it, StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            if depth >= MAX_NESTING:
                raise InvalidInput(_too_deep(name))
            stack.append((iter(item), depth + 1))
        elif isinstance(item, str):
            out.append(item.encode())
        elif isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            out.append(str(item).encode())
        else:
            raise InvalidInput(f"input {name!r}: BYTES data holds {_describe(item)}; expected strings")
    return out


def from_values(values: Any, *, name: str, datatype: str, shape: list[int]) -> np.ndarray:
    """An array from a list of values, flat (gRPC typed contents) or nested (V2 JSON `data`), checked."""
    dtype = numpy_dtype(datatype)
    if not isinstance(values, (list, tuple)):
        values = [values]
    if datatype == "BYTES":
        check_string_count(element_count(shape), name=name)
        flat = _flatten_bytes(list(values), name=name, most=element_count(shape))
        _check_string_count(len(flat), shape, name=name, what="'data'")
        return bytes_array(flat, shape)
    depth = _nesting(values)
    if depth > MAX_NESTING:
        raise InvalidInput(_too_deep(name))
    if depth == 1:  # flat, as tritonclient sends it: the count is known before numpy reads a value
        _check_count(len(values), shape, name=name, what="'data'")
    try:
        # NOTE: numpy infers the element kind first; a cast straight to `dtype` would take "1" or null for FP32
        # (1.0, NaN), 1.5 for INT32 (1) and "false" or 2 for BOOL (True) without a word.
        probe = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {name!r}: 'data' is not a list of {datatype} values with a regular shape") from None
    _check_count(probe.size, shape, name=name, what="'data'")
    arr = _typed(probe, values, name=name, datatype=datatype, dtype=dtype)
    if arr.dtype.kind == "f" and arr.dtype != np.float64 and not np.isfinite(arr).all():
        _check_no_overflow(values, arr, name=name, datatype=datatype)
    return arr.reshape(shape)


def _check_no_overflow(values: Any, arr: np.ndarray, *, name: str, datatype: str) -> None:
    """A finite value too large for FP16/FP32 would silently become infinity: refuse it instead (a NaN or
    infinity the client sent itself, as gRPC typed contents may, is kept)."""
    wide = np.asarray(values, dtype=np.float64).reshape(-1)
    over = np.flatnonzero(np.isfinite(wide) & ~np.isfinite(arr.reshape(-1)))
    if over.size:
        i = int(over[0])
        raise InvalidInput(f"input {name!r}: value {wide[i]:g} at element {i} is outside the range of {datatype} "
                           f"(largest finite value {float(np.finfo(arr.dtype).max):g})")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r:.40}"
    return f"{value!r:.40}"


def _flat_items(values: Any) -> Any:
    """Elements of nested lists in C order (only on the error path: the fast path never walks them)."""
    stack = [iter(values)]
    while stack:
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, (list, tuple)):
            stack.append(iter(item))
        else:
            yield item


def _refuse(values: Any, *, name: str, datatype: str, expected: str, ok: Callable[[Any], bool]) -> InvalidInput:
    index, bad = next(((i, v) for i, v in enumerate(_flat_items(values)) if not ok(v)), (0, values))
    return InvalidInput(f"input {name!r}: 'data' for {datatype} must hold {expected}; element {index} is "
                        f"{_describe(bad)}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_integer(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


_TYPE_PASS_MAX = 256  # elements up to which _holds_bool looks at the types straight away


def _holds_bool(values: Any, probe: np.ndarray) -> bool:
    """Whether a JSON true/false hides among the numbers of `values` (a regular nested list, read by numpy as
    `probe`).

    NOTE: numpy reads [1.5, true] as [1.5, 1.0] and [2, false] as [2, 0]: a number kind, nothing to see, so only
    the elements' own types tell: one C-level pass (map/set over the chained rows), ~0.7x numpy's own read of the
    list. A bool can only be where numpy read 0 or 1, so past _TYPE_PASS_MAX elements a vectorized look at the
    values comes first (~7-10 us whatever the size, more than the pass itself below that) and the pass runs only
    when some are 0 or 1."""
    if probe.size > _TYPE_PASS_MAX and not ((probe == 0) | (probe == 1)).any():
        return False
    items: Any = values
    for _ in range(probe.ndim - 1):
        items = chain.from_iterable(items)
    return bool in set(map(type, items))


def _typed(probe: np.ndarray, values: Any, *, name: str, datatype: str, dtype: np.dtype) -> np.ndarray:
    """`probe` (numpy's own reading of the values) as `dtype`, refusing any element that would change on the way:
    BOOL takes only true/false, integers only integral numbers within range, floats only numbers."""
    kind = probe.dtype.kind
    if probe.size == 0:
        return probe.astype(dtype)
    if dtype.kind == "b":
        if kind != "b":
            raise _refuse(values, name=name, datatype=datatype, expected="true or false",
                          ok=lambda v: isinstance(v, bool))
        return probe
    if kind in "iuf" and _holds_bool(values, probe):
        expected = "numbers" if dtype.kind == "f" else "integers"
        raise _refuse(values, name=name, datatype=datatype, expected=f"{expected} (true and false are BOOL values)",
                      ok=lambda v: not isinstance(v, bool))
    if dtype.kind == "f":
        if kind not in "iuf":
            if kind != "O" or not all(_is_number(v) for v in _flat_items(values)):
                raise _refuse(values, name=name, datatype=datatype, expected="numbers", ok=_is_number)
            probe = np.asarray(values, dtype=np.float64)
        with np.errstate(over="ignore"):  # a value past FP16/FP32's range is refused by the caller, saying which
            return probe.astype(dtype)
    if kind not in "iu":
        if kind not in "fO" or not all(_is_number(v) and _is_integer(v) for v in _flat_items(values)):
            raise _refuse(values, name=name, datatype=datatype, expected="integers",
                          ok=lambda v: _is_number(v) and _is_integer(v))
        probe = np.asarray([int(v) for v in _flat_items(values)], dtype=object).reshape(probe.shape)
    if probe.dtype == dtype:  # numpy read them as this very type (INT64, or UINT64 past INT64's range)
        return probe
    info = np.iinfo(dtype)
    low, high = probe.min(), probe.max()
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        index = int(np.flatnonzero(probe.reshape(-1) == bad)[0])
        raise InvalidInput(f"input {name!r}: value {int(bad)} at element {index} is outside the range of {datatype} "
                           f"({info.min} to {info.max})")
    return probe.astype(dtype)
