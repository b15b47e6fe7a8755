"""HTTP clients that pipeline without reading answers: `python -m loadtests.pipeline_flood --seconds 30`.

Builds a one-model repository (`scale`, tests/onnx_builders.py), starts `modelserve serve`, opens
`--connections` raw connections and, from one thread each, writes small V2 infer requests (200 per write) as
fast as the server takes them, reading nothing. Prints every 5 s the requests written and the server's RSS.
A server that parses and queues everything it is sent grows with the flood; one that pushes back (TCP flow
control once its bounded pipeline is full) stays flat (docs/RELIABILITY.md, round 5).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import orjson

from loadtests.serverproc import serve
from loadtests.stream_flood import memory_mib
from tests.onnx_builders import scale_model, write_config

BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [8, 4], "datatype": "FP32", "data": [1.0] * 32}]})
REQUEST = b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def flood(sock: socket.socket, sent: list[int], slot: int, stop: threading.Event) -> None:
    """Write requests until `stop`; a write the server does not take within 0.5 s is tried again."""
    sock.settimeout(0.5)
    chunk = REQUEST * 200
    while not stop.is_set():
        try:
            sock.sendall(chunk)
            sent[slot] += 200
        except TimeoutError:
            continue
        except OSError:
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--protocol-infer", choices=("true", "false"), default="true",
                   help="the server's http_protocol_infer setting")
    p.add_argument("--code-root", type=Path, default=None, help="serve another checkout's `service` (a before/after)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pipeline_flood-"))
    scale_model(root / "models" / "scale" / "1" / "model.onnx")
    write_config(root / "models" / "scale", "max_batch_size: 8\ndynamic_batching { }\n")
    code = {"code_root": args.code_root} if args.code_root else {}
    env = {"MODELSERVE_HTTP_PROTOCOL_INFER": args.protocol_infer}
    with serve(root / "models", log_path=root / "server.log", env=env, **code) as server:
        host, port = server.url.split(":")
        print(f"server RSS at start {memory_mib(server.pid)['VmRSS']:.0f} MiB")
        socks = [socket.create_connection((host, int(port))) for _ in range(args.connections)]
        sent, stop = [0] * len(socks), threading.Event()
        threads = [threading.Thread(target=flood, args=(s, sent, i, stop), daemon=True) for i, s in enumerate(socks)]
        for t in threads:
            t.start()
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.seconds:
            time.sleep(min(5.0, args.seconds - elapsed))  # a report interval, not a wait for a state
            print(f"t={time.monotonic() - start:4.0f} s  requests written {sum(sent):>8}  "
                  f"server RSS {memory_mib(server.pid)['VmRSS']:.0f} MiB")
        stop.set()
        for s in socks:
            s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
