"""Unit tests: the V2 codec and model configuration (config.pbtxt, auto-complete, version policy)."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.codec import from_raw, from_values
from service.core import InferResponse, OutputTensor, classify
from service.errors import InvalidInput, ModelLoadError
from service.modelrepo.config import GraphTensor, build_spec, complete_config, read_config, select_versions
from service.protocol_v2 import OutputEncoding, decode_request, encode_response


def _binary_body(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    h = orjson.dumps(header)
    return h + b"".join(chunks), len(h)


def test_binary_request_with_bytes_and_fp32_roundtrip():
    strings = [b"ab", b"", b"\xff\x00"]
    raw_s = b"".join(struct.pack("<I", len(s)) + s for s in strings)
    raw_f = np.arange(6, dtype=np.float32).tobytes()
    body, hl = _binary_body({"inputs": [
        {"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw_s)}},
        {"name": "f", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": len(raw_f)}},
    ], "parameters": {"binary_data_output": True}}, raw_s, raw_f)
    req, encoding = decode_request(body, header_length=hl, model_name="m", model_version=None)
    assert list(req.inputs["s"]) == strings
    np.testing.assert_array_equal(req.inputs["f"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert req.parameters["binary_data_output"] is True

    assert encoding == OutputEncoding(default=True)
    resp = InferResponse("m", "1", [OutputTensor("s", req.inputs["s"]), OutputTensor("f", req.inputs["f"])])
    out, out_hl = encode_response(resp, OutputEncoding(default=True, per_output={"f": False}))
    header = orjson.loads(out[:out_hl])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(raw_s)
    assert header["outputs"][1]["data"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert out[out_hl:] == raw_s


def test_json_data_nested_flat_and_errors():
    nested = from_values([[1, 2], [3, 4]], name="x", datatype="INT32", shape=[2, 2])
    flat = from_values([1, 2, 3, 4], name="x", datatype="INT32", shape=[2, 2])
    np.testing.assert_array_equal(nested, flat)
    assert nested.dtype == np.int32
    with pytest.raises(InvalidInput, match=r"shape \[3\] needs 3 elements, 'data' has 4"):
        from_values([1, 2, 3, 4], name="x", datatype="FP32", shape=[3])
    with pytest.raises(InvalidInput, match="not a list of FP32 values"):
        from_values([[1, 2], [3]], name="x", datatype="FP32", shape=[3])
    with pytest.raises(InvalidInput, match="unknown datatype 'FLOAT32'; expected one of BOOL"):
        from_values([1.0], name="x", datatype="FLOAT32", shape=[1])


def test_binary_errors_say_what_was_expected():
    with pytest.raises(InvalidInput, match="needs 16 bytes, got 8"):
        from_raw(memoryview(b"\0" * 8), name="x", datatype="FP32", shape=[4])
    with pytest.raises(InvalidInput, match="claims 100 bytes past the data's end"):
        from_raw(memoryview(struct.pack("<I", 100) + b"ab"), name="x", datatype="BYTES", shape=[1])
    body, hl = _binary_body({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                          "parameters": {"binary_data_size": 4}}]}, b"\0" * 12)
    with pytest.raises(InvalidInput, match="8 bytes of binary data follow the inputs"):
        decode_request(body, header_length=hl, model_name="m", model_version=None)
    with pytest.raises(InvalidInput, match="outside the body"):
        decode_request(body, header_length=len(body) + 1, model_name="m", model_version=None)


def test_classification_strings():
    out = classify(np.array([[0.1, 0.7, 0.2]], np.float32), k=2, labels=["a", "b", "c"], batched=True)
    assert [s.decode() for s in out[0]] == ["0.700000:1:b", "0.200000:2:c"]


G_IN = [GraphTensor("x", "FP32", (None, 3, None))]
G_OUT = [GraphTensor("y", "FP32", (None, 10))]


def _complete(text: str = "", *, has_file: bool = True):
    cfg = text_format.Parse(text, mc.ModelConfig())
    given = "max_batch_size" in text
    return complete_config(cfg, name="m", graph_inputs=G_IN, graph_outputs=G_OUT, max_batch_size_given=given,
                           default_max_batch_size=32, has_file=has_file)


def test_autocomplete_from_graph():
    cfg = _complete(has_file=False)
    assert cfg.max_batch_size == 32 and cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [3, -1] and cfg.input[0].data_type == mc.TYPE_FP32
    assert list(cfg.output[0].dims) == [10]
    assert _complete("max_batch_size: 0").max_batch_size == 0


def test_config_mismatches_are_load_errors():
    with pytest.raises(ModelLoadError, match="config dims \\[4, -1\\] do not match the graph's \\[3, -1\\]"):
        _complete('max_batch_size: 8 input [{ name: "x" data_type: TYPE_FP32 dims: [4, -1] }]')
    with pytest.raises(ModelLoadError, match="config says INT64, the graph has FP32"):
        _complete('max_batch_size: 8 input [{ name: "x" data_type: TYPE_INT64 dims: [3, -1] }]')
    with pytest.raises(ModelLoadError, match="not in the ONNX graph"):
        _complete('max_batch_size: 8 output [{ name: "z" data_type: TYPE_FP32 dims: [10] }]')
    with pytest.raises(ModelLoadError, match="platform 'tensorflow_savedmodel'"):
        _complete('platform: "tensorflow_savedmodel"')
    with pytest.raises(ModelLoadError, match="preferred_batch_size 64 exceeds max_batch_size 8"):
        build_spec(_complete("max_batch_size: 8 dynamic_batching { preferred_batch_size: [64] }"), model_dir=None)


def test_read_config_reports_parse_errors(tmp_path):
    (tmp_path / "config.pbtxt").write_text("max_batch_size: banana")
    with pytest.raises(ModelLoadError, match="not a valid Triton ModelConfig"):
        read_config(tmp_path)


@pytest.mark.parametrize("policy,expected", [
    ("", [3]),
    ("version_policy: { latest: { num_versions: 2 } }", [2, 3]),
    ("version_policy: { all: {} }", [1, 2, 3]),
    ("version_policy: { specific: { versions: [1, 3] } }", [1, 3]),
])
def test_version_policy(policy, expected):
    assert select_versions(text_format.Parse(policy, mc.ModelConfig()), [1, 2, 3]) == expected


def test_version_policy_missing_specific_version():
    cfg = text_format.Parse('name: "m" version_policy: { specific: { versions: [7] } }', mc.ModelConfig())
    with pytest.raises(ModelLoadError, match=r"asks for versions \[7\], found \[1, 2\]"):
        select_versions(cfg, [1, 2])
