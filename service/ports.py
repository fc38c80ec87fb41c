"""Ports for servers Refit starts when none is given (tests, benchmarks, HAProxy's side ports).

A port the kernel hands out with ``bind(("", 0))`` comes from the ephemeral range, which every
outgoing connection on the host draws from too: under load a client socket can take it between
choosing it and the server binding it ("Address already in use", seen with HAProxy starting
seconds after the choice). A listening port is therefore drawn below the ephemeral range, and
outside the ports Serve's direct ingress gives replicas (30000-31000)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RESERVED = range(30000, 31001)  # Serve's direct-ingress replica ports
_LOW = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def listen_port(host: str = "127.0.0.1", *, tries: int = 50) -> int:
    """A TCP port free on ``host`` now, below the ephemeral range (else any free one)."""
    top = _ephemeral_start()
    rng = random.SystemRandom()
    for _ in range(tries if top > _LOW + 1000 else 0):
        port = rng.randrange(_LOW, top)
        if port in _RESERVED:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
