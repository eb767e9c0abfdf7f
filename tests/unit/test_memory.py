"""Memory the process freed goes back to the operating system when asked (glibc keeps it otherwise)."""

from __future__ import annotations

import numpy as np

from health_mlops.system.memory import return_free_memory


def heap_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


def test_freed_read_buffers_between_live_ones_are_returned() -> None:
    # What a server receiving many bodies at once leaves: buffers of a few hundred KiB, most freed, some still
    # live between them (after a freed large block has raised glibc's threshold for serving them from the heap).
    threshold_raiser = np.ones(300 * 1024, dtype=np.uint8)
    del threshold_raiser
    live, freed = [], []
    for index in range(400):
        (live if index % 8 == 0 else freed).append(np.full(200 * 1024 + index, index % 251, dtype=np.uint8))
    del freed
    before = heap_mib()
    return_free_memory()
    assert before - heap_mib() > 30  # of the ~68 MiB freed
    assert all(int(buffer[-1]) == index * 8 % 251 for index, buffer in enumerate(live))  # the live ones intact
