"""Writing files safely, in one place: atomically (a reader never sees half a file, and a crash leaves the old
one) and privately (readable by the owner only, even over a file that existed with wider permissions)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (hidden, so no reader globbing for it sees it)."""
    return path.with_name(f".{path.name}.tmp")


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or replaced (modification time, size, inode), or None if it is
    missing: how a service notices a credentials file changed under it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _open_private(path: Path, flags: int) -> int:
    """A descriptor on `path`, created 0600 (never world-readable, even briefly) and made 0600 if it existed."""
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def private_folder(folder: Path) -> None:
    """`folder` and any missing folder above it, created 0700 (only `Path.mkdir`'s last level takes its mode)."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    for created in reversed(missing):
        created.mkdir(mode=0o700, exist_ok=True)


def open_atomically(path: Path) -> BinaryIO:
    """A handle to write `path` through, a piece at a time: nothing is at `path` until `commit_atomically`. The
    file is 0600 from its creation, in folders created 0700: what we write holds patient-derived data (updates,
    states, run records) or credentials."""
    private_folder(path.parent)
    return os.fdopen(_open_private(temporary_path(path), os.O_WRONLY | os.O_TRUNC), "wb")


def commit_atomically(handle: BinaryIO, path: Path, *, before_rename: Callable[[], None] | None = None) -> None:
    """Make what was written through `handle` (from `open_atomically(path)`) durable and put it at `path`."""
    with handle:
        handle.flush()
        os.fsync(handle.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(temporary_path(path), path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def write_atomically(path: Path, data: bytes | memoryview, *, before_rename: Callable[[], None] | None = None) -> None:
    handle = open_atomically(path)
    handle.write(data)
    commit_atomically(handle, path, before_rename=before_rename)


def append_private(path: Path, data: bytes) -> None:
    """Append `data` to `path` durably, the file 0600 (made so if it existed) in folders created 0700."""
    private_folder(path.parent)
    with os.fdopen(_open_private(path, os.O_WRONLY | os.O_APPEND), "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def open_private(path: Path) -> IO[str]:
    """A text file for writing, created 0600 (never world-readable, even briefly) and made 0600 if it existed."""
    return os.fdopen(_open_private(path, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8", newline="")


def write_private(path: Path, text: str) -> None:
    with open_private(path) as handle:
        handle.write(text)
