"""The integration tests' ports: found free, they must stay free until a service binds them."""

from __future__ import annotations

from tests.conftest import ephemeral_port_range, free_port_range


def test_ports_lie_below_the_range_outgoing_connections_take() -> None:
    low, _ = ephemeral_port_range()
    for count in (1, 13, 20):
        for _ in range(50):
            base = free_port_range(count)
            assert base >= 1024 and base + count <= low, (base, count, low)
