"""An unread gRPC stream against a real server: `python -m loadtests.stream_flood --requests 30000`.

Builds a one-model repository (`double`, tests/onnx_builders.py), starts `modelserve serve` with gRPC, opens
one ModelStreamInfer, sends `--requests` requests (each with a `--id-bytes` id) and reads nothing for
`--unread-secs`, then reads every answer. Prints the server's RSS before, after the unread wait and its peak
(VmHWM), and how many requests were answered. A server that takes requests faster than its client reads
answers grows with the stream; one that pushes back stays flat (docs/RELIABILITY.md, audit round 3).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from loadtests.serverproc import serve
from tests.onnx_builders import scale_model


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def requests(count: int, id_bytes: int) -> Iterator[pb.ModelInferRequest]:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[8, 4])
    data = np.ones((8, 4), np.float32).tobytes()
    for i in range(count):
        yield pb.ModelInferRequest(model_name="double", inputs=[tensor], raw_input_contents=[data],
                                   id=f"{i}:".ljust(id_bytes, "x"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=30000)
    p.add_argument("--id-bytes", type=int, default=20000)
    p.add_argument("--unread-secs", type=float, default=20.0)
    p.add_argument("--code-root", type=Path, default=None, help="serve another checkout's `service` (a before/after)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="stream_flood-"))
    scale_model(root / "models" / "double" / "1" / "model.onnx", factor=2.0)
    code = {"code_root": args.code_root} if args.code_root else {}
    with serve(root / "models", log_path=root / "server.log", grpc=True, **code) as server:
        assert server.grpc_url is not None
        before = memory_mib(server.pid)
        channel = grpc.insecure_channel(server.grpc_url)
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            requests(args.requests, args.id_bytes), timeout=600)
        time.sleep(args.unread_secs)  # the point of the tool: a client that does not read
        unread = memory_mib(server.pid)
        answered = sum(1 for answer in call if not answer.error_message)
        after = memory_mib(server.pid)
        channel.close()
    print(f"{args.requests} requests of {args.id_bytes} B ids, unread for {args.unread_secs:g} s: RSS "
          f"{before['VmRSS']:.0f} MiB before, {unread['VmRSS']:.0f} MiB unread, peak {after['VmHWM']:.0f} MiB; "
          f"answered {answered} of {args.requests}")
    return 0 if answered == args.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
