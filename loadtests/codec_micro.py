"""Per-request codec CPU, long way vs fast path, in one process (robust to a busy machine: CPU time, best of 5).

    .venv/bin/python -m loadtests.codec_micro

For a bench-CNN-shaped request ([1,1,28,28] FP32 in, [1,10] FP32 out): V2 HTTP binary decode (full JSON parse
and checks vs a remembered header, service/v2_plans.py) and encode (dicts + orjson + copies vs a remembered
header + views), gRPC encode (message built field by field + SerializeToString vs template + raw views).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from service.core import InferResponse, OutputTensor
from service.protocol_grpc import decode_infer, encode_infer, encode_infer_wire
from service.protocol_v2 import OutputEncoding, decode_request, encode_response, encode_response_parts
from service.v2_plans import RequestPlans

ROUNDS, CALLS = 5, 20000


def cpu_us(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.process_time()
        for _ in range(CALLS):
            fn()
        best = min(best, time.process_time() - t0)
    return best / CALLS * 1e6


def main() -> int:
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    header = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
                           "parameters": {"binary_data_output": True}})
    body, hl = header + x.tobytes(), len(header)
    plans = RequestPlans()
    req, enc = decode_request(body, header_length=hl, model_name="cnn", model_version=None)
    plans.learn(body, header_length=hl, req=req, encoding=enc)
    plan = plans.get(body, hl)
    assert plan is not None
    batch_out = np.random.default_rng(1).standard_normal((16, 10)).astype(np.float32)
    resp = InferResponse("cnn", "1", [OutputTensor("logits", batch_out[3:4])])
    grpc_req = pb.ModelInferRequest(model_name="cnn")
    grpc_req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    grpc_req.raw_input_contents.append(x.tobytes())
    rows = [
        ("HTTP decode, binary", lambda: decode_request(body, header_length=hl, model_name="cnn", model_version=None),
         lambda: plan.request(body, header_length=hl, model_name="cnn", model_version=None)),
        ("HTTP encode, binary", lambda: encode_response(resp, OutputEncoding(default=True)),
         lambda: b"".join(encode_response_parts(resp, OutputEncoding(default=True))[0])),
        ("gRPC encode", lambda: encode_infer(resp).SerializeToString(), lambda: encode_infer_wire(resp)),
    ]
    print(f"{'step':<22}{'long way µs':>14}{'fast path µs':>14}")
    for name, slow, fast in rows:
        print(f"{name:<22}{cpu_us(slow):>14.2f}{cpu_us(fast):>14.2f}")
    print(f"{'gRPC decode':<22}{'':>14}{cpu_us(lambda: decode_infer(grpc_req)):>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
