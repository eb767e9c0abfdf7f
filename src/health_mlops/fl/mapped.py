"""Files read through memory maps a block at a time, so that a large file is never resident as a whole.

A memory-mapped array's pages stay in the process (count in its RSS) once they are read, until the file is
unmapped: a 40 MB update read once is 40 MB of the aggregator for as long as it is mapped, and a robust strategy
reading 50 of them block by block ends up holding all 50. `blocks` walks an array a block at a time and, when the
array views a file mapped by `map_file`, lets the pages of each block go once the next block is asked for
(madvise DONTNEED: they leave the process, not the page cache, and are read again from it if used again). The
values are never affected, only where they live. Nothing here does network I/O; the core uses it to read its
inputs.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# A block: large enough that the call to let it go costs nothing next to reading it, small enough to stay in cache.
BLOCK_BYTES = 4 * 1024 * 1024
# Elements per block when tensors of different dtypes (float32, float64) are walked side by side.
LOCKSTEP_ELEMENTS = BLOCK_BYTES // 8


def map_file(path: Path, offset: int) -> np.ndarray:
    """The bytes of a file from `offset` on, read-only and memory-mapped (unmapped once no array views them)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size <= offset:
            return np.empty(0, dtype=np.uint8)
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapping, dtype=np.uint8, offset=offset)


def blocks(tensor: np.ndarray, block_elements: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first element, block) over a tensor's values in order, flattened, `block_elements` at a time (BLOCK_BYTES
    by default). The blocks of a tensor mapped by `map_file` leave the process's memory once read, RELEASE_BYTES or
    more at a time, when the next block is asked for (a block can still be read after: its pages come back from the
    page cache)."""
    flat = np.asarray(tensor).reshape(-1)
    step = block_elements or max(1, BLOCK_BYTES // max(1, flat.itemsize))
    mapping = mapping_of(flat)
    unreleased: int | None = None  # address of the first byte read and not yet let go
    for start in range(0, flat.size, step):
        block = flat[start:start + step]
        yield start, block
        if mapping is not None:
            unreleased = block.ctypes.data if unreleased is None else unreleased
            end = block.ctypes.data + block.nbytes
            if end - unreleased >= RELEASE_BYTES or start + step >= flat.size:
                _let_go(*mapping, unreleased, end)
                unreleased = None


def mapping_of(array: np.ndarray) -> tuple[mmap.mmap, int] | None:
    """The file mapping `array` views (made by `map_file`) and the address where it begins, or None."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap):
        return base.obj, np.frombuffer(base, dtype=np.uint8).ctypes.data
    return None


# What is let go at once: many small blocks (a robust strategy reads 84 KiB of each of 50 updates in turn) are let
# go together, since each call costs a walk of the page tables.
RELEASE_BYTES = 512 * 1024
# How far before a range its pages are let go too: reading a page maps its neighbours already in the page cache
# ("fault-around", 64 KiB by default; a whole large folio, up to 2 MiB), so reading a block maps back the end of
# the one before, after that one was let go.
BEHIND_BYTES = 2 * 1024 * 1024


def _let_go(mapping: mmap.mmap, mapping_address: int, begin_address: int, end_address: int) -> None:
    """Drop the pages holding the bytes [begin_address, end_address), and those up to BEHIND_BYTES before them,
    from this process (a page shared with what follows is read again from the page cache)."""
    begin = begin_address - mapping_address
    first = max(0, begin - BEHIND_BYTES) // mmap.PAGESIZE * mmap.PAGESIZE
    last = min(len(mapping), end_address - mapping_address)
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
