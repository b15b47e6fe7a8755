"""The models `loadtests.fuzz_v2` and tests/test_fuzz_round5.py fuzz: one per datatype and shape kind.

    scale        FP32 [N, 4] -> y = 2x; max_batch_size 8, dynamic batching (the isolation checks batch it)
    two_io       FP32 a, b [N, L] -> sum [N, L], idx INT64 [N, 1]: two inputs and outputs, a variable dim
    strings      BYTES [N, 1] identity          not      BOOL [N, 2] -> Not
    id_<type>    INT8 / INT16 / INT32 / UINT8 / UINT64 / FP64 identities, batched, dims [-1]
    id_fp16      FP16 [-1, -1] identity without batching
    optional     FP32 INPUT0, INPUT1 [-1] -> OUTPUT0 [1] the sum of all elements; INPUT1 optional
"""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto

from loadtests.triton_qa_models import _io_block, summing_onnx
from tests.onnx_builders import not_model, scale_model, string_model, two_io_model, write_config
from tests.triton_models import identity_onnx, save_model

BATCHING = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 2000 }\n"
IDENTITIES = {"int8": (TensorProto.INT8, "TYPE_INT8"), "int16": (TensorProto.INT16, "TYPE_INT16"),
              "int32": (TensorProto.INT32, "TYPE_INT32"), "uint8": (TensorProto.UINT8, "TYPE_UINT8"),
              "uint64": (TensorProto.UINT64, "TYPE_UINT64"), "fp64": (TensorProto.DOUBLE, "TYPE_FP64")}


def build_fuzz_models(root: Path) -> Path:
    """Write the fuzzed models under `root` (a model repository); returns `root`."""
    scale_model(root / "scale" / "1" / "model.onnx")
    write_config(root / "scale", BATCHING)
    two_io_model(root / "two_io" / "1" / "model.onnx")
    write_config(root / "two_io", BATCHING)
    string_model(root / "strings" / "1" / "model.onnx")
    write_config(root / "strings", BATCHING)
    not_model(root / "not" / "1" / "model.onnx")
    write_config(root / "not", BATCHING)
    for short, (onnx_type, config_type) in IDENTITIES.items():
        config = (f'platform: "onnxruntime_onnx"\n{BATCHING}' + _io_block("input", ["INPUT0"], config_type, "-1")
                  + _io_block("output", ["OUTPUT0"], config_type, "-1"))
        save_model(root / f"id_{short}", identity_onnx(onnx_type, ["N", "L"]), config)
    config = ('platform: "onnxruntime_onnx"\nmax_batch_size: 0\n' + _io_block("input", ["INPUT0"], "TYPE_FP16", "-1, -1")
              + _io_block("output", ["OUTPUT0"], "TYPE_FP16", "-1, -1"))
    save_model(root / "id_fp16", identity_onnx(TensorProto.FLOAT16, ["H", "W"]), config)
    config = ('platform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
              + _io_block("input", ["INPUT0", "INPUT1"], "TYPE_FP32", "-1", optional=("INPUT1",))
              + _io_block("output", ["OUTPUT0"], "TYPE_FP32", "1"))
    save_model(root / "optional", summing_onnx(["INPUT0"], ["INPUT1"]), config)
    return root
