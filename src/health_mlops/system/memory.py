"""Giving memory the process has freed back to the operating system.

glibc's malloc keeps freed memory in its arenas for reuse instead of returning it. A server that takes large
bodies through many connections at once (the aggregator, when dozens of hospitals send their updates together)
churns through read buffers of a few hundred KiB each; the freed ones interleave with live ones, so the arenas
cannot shrink from their top, and the process stays tens of MB above what it uses. `malloc_trim` returns every
free page (glibc 2.8+ also releases pages inside the arenas), at the cost of a walk over them: a few ms at most.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_malloc_trim: Callable[[int], int] | None = None
_libc_name = ctypes.util.find_library("c")
if _libc_name is not None:
    _malloc_trim = getattr(ctypes.CDLL(_libc_name), "malloc_trim", None)  # glibc only


def return_free_memory() -> None:
    """Return the memory malloc holds free to the operating system (nothing where the C library cannot)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
