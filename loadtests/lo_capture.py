"""Which connections to a loopback port the server reset, and what came before: a packet capture on `lo`.

Used by `python -m loadtests.shutdown_check --capture` (Linux, root). A connection refused at connect (SYN, then
RST) is left out; every other connection that saw a RST from the server is listed with its last packets, times
relative to a given moment (SIGTERM): an accept-queue reset shows as handshake + request + RST with no byte of
answer, a connection closed under a keep-alive client as answers + FIN (or RST) + the client's next request.

NOTE: hand-written (an AF_PACKET socket, IPv4 and TCP headers unpacked) because tcpdump is not installed here and
scapy would be a dependency for one diagnostic; a Python reader can miss packets under load (a gap, not a lie).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import defaultdict

_ETH_P_ALL = 0x0003
_FLAGS = ((0x02, "S"), (0x10, "A"), (0x08, "P"), (0x01, "F"), (0x04, "R"))


class LoCapture:
    """TCP packets to and from `port` on `lo`, from construction until `resets()`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._packets: list[tuple[float, bool, int, int, int]] = []  # time, from server, client port, flags, bytes
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(_ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue  # lo shows each packet twice; IPv4 TCP only
            ip = frame[14:]
            ihl = (ip[0] & 15) * 4
            total = struct.unpack_from("!H", ip, 2)[0]
            src, dst = struct.unpack_from("!HH", ip, ihl)
            if self.port not in (src, dst):
                continue
            tcp = ip[ihl:]
            payload = total - ihl - (tcp[12] >> 4) * 4
            self._packets.append((time.monotonic(), src == self.port, dst if src == self.port else src,
                                  tcp[13], payload))

    def resets(self, t0: float, *, last: int = 12) -> list[str]:
        """Stop; one block of lines per connection the server reset after its handshake (times from `t0`)."""
        self._stop.set()
        self._thread.join()
        self._sock.close()
        conns: dict[int, list[tuple[float, bool, int, int]]] = defaultdict(list)
        for t, from_server, client, flags, size in self._packets:
            conns[client].append((t, from_server, flags, size))
        lines = []
        for client, packets in conns.items():
            reset = any(from_server and flags & 0x04 for _, from_server, flags, _ in packets)
            refused = len(packets) == 2 and packets[0][2] == 0x02  # SYN, then RST: refused at connect
            if not reset or refused:
                continue
            lines.append(f"connection from port {client} reset by the server:")
            for t, from_server, flags, size in packets[-last:]:
                names = "".join(name for bit, name in _FLAGS if flags & bit)
                lines.append(f"  {1000 * (t - t0):+9.1f} ms {'server' if from_server else 'client'} "
                             f"{names:5} {size} bytes")
        return lines
