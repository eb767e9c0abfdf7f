"""Mapped files read a block at a time: the values are those of the file, and a walk leaves no block resident."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from health_mlops.fl.mapped import BLOCK_BYTES, blocks, map_file, mapping_of


def rss_file_kib() -> int:
    """This process's resident pages mapped from files: RssFile, plus RssShmem for a file on tmpfs (/tmp in a
    container or a chroot), whose pages are shared memory."""
    with open("/proc/self/status", encoding="ascii") as status:
        return sum(int(line.split()[1]) for line in status if line.startswith(("RssFile:", "RssShmem:")))


@pytest.mark.parametrize("block_elements", [None, 1, 7, 1000])
def test_blocks_give_every_value_in_order(block_elements: int | None) -> None:
    tensor = np.arange(24, dtype=np.float32).reshape(6, 4).T  # not contiguous: walked in its own order
    walked = [(start, block.copy()) for start, block in blocks(tensor, block_elements)]
    assert np.array_equal(np.concatenate([block for _, block in walked]), tensor.reshape(-1))
    assert [start for start, _ in walked] == list(np.cumsum([0] + [b.size for _, b in walked[:-1]]))


def test_a_mapped_file_walked_in_blocks_is_never_resident_as_a_whole(tmp_path: Path) -> None:
    values = np.random.default_rng(3).standard_normal(16 * BLOCK_BYTES // 4, dtype=np.float32)  # 64 MiB
    path = tmp_path / "update.bin"
    header = b"x" * 24  # the data need not begin on a page
    path.write_bytes(header + values.tobytes())
    size_kib = values.nbytes // 1024

    walked = map_file(path, len(header)).view(np.float32)
    assert mapping_of(walked) is not None
    before = rss_file_kib()
    total = 0.0
    for start, block in blocks(walked):
        assert np.array_equal(block[:5], values[start:start + 5])
        total += float(block.sum(dtype=np.float64))
    after_blocks = rss_file_kib()
    assert total == pytest.approx(float(values.sum(dtype=np.float64)))
    assert after_blocks - before < size_kib / 8  # at most a block or two

    read_whole = map_file(path, len(header)).view(np.float32)  # the same walk as one read: the file stays resident
    before = rss_file_kib()
    assert float(read_whole.sum(dtype=np.float64)) == pytest.approx(total)
    assert rss_file_kib() - before > size_kib / 2


def test_files_walked_side_by_side_in_small_blocks_are_never_resident_as_a_whole(tmp_path: Path) -> None:
    """A robust strategy's walk: a small block of each file in turn. Reading a block maps back the end of the
    one before it (fault-around), which must go too."""
    values = np.random.default_rng(4).standard_normal(2 * BLOCK_BYTES // 4, dtype=np.float32)  # 8 MiB a file
    files = []
    for index in range(8):
        path = tmp_path / f"update-{index}.bin"
        with open(path, "wb") as handle:  # written as a result arrives: in pieces
            for start in range(0, values.nbytes, 65536):
                handle.write(values.data.cast("B")[start:start + 65536])
        files.append(map_file(path, 0).view(np.float32))
    before = rss_file_kib()
    peak = 0
    for parts in zip(*(blocks(mapped, 20_971) for mapped in files)):  # 84 KB blocks, not page-aligned
        for start, block in parts:  # every value read
            assert np.array_equal(block, values[start:start + block.size])
        peak = max(peak, rss_file_kib() - before)
    assert peak < len(files) * values.nbytes // 1024 / 8


def test_an_empty_file_tail_maps_to_no_bytes(tmp_path: Path) -> None:
    path = tmp_path / "header-only"
    path.write_bytes(b"12345678")
    assert map_file(path, 8).size == 0 and list(blocks(map_file(path, 8))) == []
