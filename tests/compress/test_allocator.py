"""Pinning glibc's mmap threshold: a large block freed goes back to the kernel, whatever was freed before it."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from serve_pruned.compress.allocator import pin_mmap_threshold

def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024

assert pin_mmap_threshold()
before, kept = anon(), []
for size in (24, 20, 28, 22, 30):  # MiB: each below glibc's 32 MiB ceiling, as a layer's tensors are
    block = bytearray(size * 2**20)  # zero-filled: every page touched
    kept.append(bytearray(100))  # something small allocated after it, so the heap cannot shrink past it
    del block
print(anon() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_blocks_freed_after_the_pin_leave_nothing_resident():
    # its own process: the pin is process-wide
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    # without the pin this keeps about 22 MiB resident here: after the first block glibc serves such sizes
    # from the heap, and a freed block under a live small one stays there
    assert int(out.stdout) < 4 * 2**20
