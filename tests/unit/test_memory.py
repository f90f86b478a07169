"""release_freed_memory and reclaiming: the pages of a mapped weights file go back to the OS."""

from __future__ import annotations

import mmap
import sys
import threading
import time
from pathlib import Path

import pytest

from stratus_engine.model_dir import reclaiming, release_freed_memory

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


def test_the_weights_file_is_paged_out_while_a_session_builds(tmp_path):
    # Given a 16 MB weights file that a block reads through while `reclaiming` runs beside it
    path = tmp_path / "model.onnx.data"
    path.write_bytes(bytes(range(256)) * (16 << 12))
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        with reclaiming(path, every_s=0.005):
            assert sum(m[i] for i in range(0, len(m), 4096)) >= 0
            deadline = time.monotonic() + 5
            while resident_kb(path) > 1_000 and time.monotonic() < deadline:
                time.sleep(0.005)
            # Then the pages read leave the process before the block ends (not only after it)
            assert resident_kb(path) < 1_000
        # and the reclaiming thread is gone when the block ends
        assert not any(t.name == "reclaim-weights" for t in threading.enumerate())
