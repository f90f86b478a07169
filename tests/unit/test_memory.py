"""release_freed_memory: the pages of a mapped weights file go back to the OS after loading."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

from stratus_engine.model_dir import release_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def resident_kb(path: Path) -> int:
    """The resident size of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside, target = 0, False, str(path.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and head[0][0] in "0123456789abcdef" and ":" not in head[0]:
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_the_mapped_weights_file_is_paged_out_and_read_back_on_use(tmp_path):
    # Given a 16 MB weights file mapped and read through (as building a session reads it)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(bytes(range(256)) * (16 << 12))
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert sum(m[i] for i in range(0, len(m), 4096)) >= 0 and resident_kb(path) > 15_000
        # When memory is released, then its pages leave the process, and a read brings back its page
        release_freed_memory(path)
        assert resident_kb(path) < 1_000
        assert m[(5 << 20) + 7] == 7 and resident_kb(path) < 8_000  # (the page, and the kernel's read-ahead)
        # (another file's mapping is left alone)
        release_freed_memory(tmp_path / "other.data")
