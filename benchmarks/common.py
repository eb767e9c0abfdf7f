"""Helpers the benchmarks share."""

from __future__ import annotations

import socket


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free on 127.0.0.1 right now."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count < 65000 and all(_free(p) for p in range(base, base + count)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
