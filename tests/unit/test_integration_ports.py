"""What keeps pytest-xdist's workers apart: ports found free stay free until a service binds them, two workers never
start services on the same port, and what several workers need is made once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ephemeral_port_range, free_port_range, made_once, worker_ports


def test_ports_lie_below_the_range_outgoing_connections_take() -> None:
    low, _ = ephemeral_port_range()
    for count in (1, 13, 20):
        for _ in range(50):
            base = free_port_range(count)
            assert base >= 1024 and base + count <= low, (base, count, low)


def test_each_worker_picks_from_its_own_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    picked: dict[int, set[int]] = {}
    for worker in range(4):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
        low, high = worker_ports()
        assert high - low > 1000  # room for every test's services
        bases = {free_port_range(20) for _ in range(30)}
        assert all(low <= base and base + 20 <= high for base in bases)
        picked[worker] = {port for base in bases for port in range(base, base + 20)}
    assert all(picked[a].isdisjoint(picked[b]) for a in range(4) for b in range(a + 1, 4))


def test_what_several_workers_need_is_made_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    made: list[int] = []

    def make(folder: Path) -> None:
        time.sleep(0.05)  # long enough for the other callers to arrive while it is being made
        made.append(1)
        (folder / "made").write_text("once")

    tmp_path_factory.getbasetemp()  # made on first use: once, before the callers ask at the same time
    with ThreadPoolExecutor(4) as callers:
        folders = set(callers.map(lambda _: made_once(tmp_path_factory, "made-once-test", make), range(4)))
    assert len(made) == 1 and len(folders) == 1
    assert (folders.pop() / "made").read_text() == "once"
