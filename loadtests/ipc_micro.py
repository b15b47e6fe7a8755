"""What the multi-process design's hand-off would cost: a front end sends ~100-byte request descriptors to a
model-worker process over a Unix socket and gets one back per request (docs/BENCHMARKS.md, "Several front ends").

    python -m loadtests.ipc_micro --messages 20000 --per-write 1,16

Reports CPU-us per request of the two processes together (process CPU time over round trips), for descriptors
written one at a time and `per-write` at a time (what a front end would do with the requests one loop iteration
decoded). Tensors would travel through shared memory, not through the socket, so only descriptors are timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import sys
import time

import uvloop

DESCRIPTOR = struct.Struct("<32sQQ4q")  # model name, slot offset, byte length, shape (4 dims): ~80 bytes


async def _worker(sock: socket.socket) -> None:
    """Echo each descriptor back (the model worker's answer is a descriptor of the same size)."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    size = DESCRIPTOR.size
    while True:
        data = await reader.read(size * 256)
        if not data:
            return
        writer.write(data)  # whole descriptors only: the front end writes whole ones and reads what it sent


async def _front(sock: socket.socket, *, messages: int, per_write: int) -> float:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    one = DESCRIPTOR.pack(b"cnn", 0, 3136, 1, 1, 28, 28)
    chunk = one * per_write
    t0 = time.process_time()
    for _ in range(messages // per_write):
        writer.write(chunk)
        await reader.readexactly(len(chunk))
    cpu = time.process_time() - t0
    writer.close()
    return cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.ipc_micro", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--per-write", default="1,16")
    args = p.parse_args(argv)
    for per_write in [int(v) for v in args.per_write.split(",")]:
        front, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the model worker
            front.close()
            uvloop.run(_worker(worker))
            os._exit(0)
        worker.close()
        cpu_front = uvloop.run(_front(front, messages=args.messages, per_write=per_write))
        front.close()
        _, _, usage = os.wait4(pid, 0)
        cpu_worker = usage.ru_utime + usage.ru_stime
        per = (cpu_front + cpu_worker) / args.messages * 1e6
        print(f"{per_write:3d} descriptor(s) per write: {per:6.1f} CPU-us per request round trip "
              f"(front {cpu_front / args.messages * 1e6:.1f}, worker {cpu_worker / args.messages * 1e6:.1f}); "
              f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
