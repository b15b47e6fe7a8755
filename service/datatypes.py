"""Datatype tables: KServe V2 names, numpy dtypes, Triton config enums and ONNX element types."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from service.errors import InvalidInput

# V2 datatype name -> numpy dtype. BYTES is carried as an object array of `bytes`.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}

# Triton ModelConfig DataType enum <-> V2 name ("TYPE_FP32" <-> "FP32"; TYPE_STRING <-> BYTES).
_CONFIG_TO_V2 = {
    mc.TYPE_BOOL: "BOOL",
    mc.TYPE_UINT8: "UINT8",
    mc.TYPE_UINT16: "UINT16",
    mc.TYPE_UINT32: "UINT32",
    mc.TYPE_UINT64: "UINT64",
    mc.TYPE_INT8: "INT8",
    mc.TYPE_INT16: "INT16",
    mc.TYPE_INT32: "INT32",
    mc.TYPE_INT64: "INT64",
    mc.TYPE_FP16: "FP16",
    mc.TYPE_FP32: "FP32",
    mc.TYPE_FP64: "FP64",
    mc.TYPE_STRING: "BYTES",
}
_V2_TO_CONFIG = {v: k for k, v in _CONFIG_TO_V2.items()}

# ONNX Runtime's type strings as reported by NodeArg.type.
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def config_to_v2(data_type: int) -> str:
    """Map a ModelConfig DataType enum value to its V2 datatype name."""
    try:
        return _CONFIG_TO_V2[data_type]
    except KeyError:
        raise ValueError(f"unsupported data_type {mc.DataType.Name(data_type)}") from None


def v2_to_config(datatype: str) -> int:
    """Map a V2 datatype name to the ModelConfig DataType enum."""
    return _V2_TO_CONFIG[datatype]


def ort_to_v2(ort_type: str) -> str:
    """Map an ONNX Runtime type string ("tensor(float)") to a V2 datatype name."""
    try:
        return _ORT_TO_V2[ort_type]
    except KeyError:
        # NOTE: BF16 is a V2 datatype, but onnxruntime's Python API has no NumPy type to hand bfloat16 tensors
        # over in (nor back), so a graph with bfloat16 inputs or outputs is refused at load.
        hint = ("; BF16 inputs and outputs are not served: cast to FLOAT/FLOAT16 at the graph's edges"
                if ort_type == "tensor(bfloat16)" else "")
        raise ValueError(f"unsupported ONNX tensor type {ort_type!r}; served types are "
                         f"{sorted(_ORT_TO_V2)}{hint}") from None


def numpy_dtype(datatype: str) -> np.dtype:
    """numpy dtype for a V2 datatype name; InvalidInput naming the valid names otherwise."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidInput(
            f"unknown datatype {datatype!r}; expected one of {', '.join(V2_TO_NUMPY)}"
        ) from None


def v2_datatype(array: np.ndarray) -> str:
    """V2 datatype name of a numpy array (unicode and bytes arrays are BYTES)."""
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[array.dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {array.dtype} has no V2 datatype") from None
