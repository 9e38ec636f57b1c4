"""Large host allocations handed back to the kernel when freed: glibc's mmap threshold pinned (torch-free).

Streaming allocates and frees one decoder layer's tensors (a few to tens of MB each) again and again, in sizes
that change from one candidate shape to the next. After the first free of a mapped block glibc raises its mmap
threshold to that block's size (up to 32 MiB), so later blocks come from the heap, whose holes only blocks that
fit reuse: the same run's peak RSS then varies with the depth and from run to run (docs/benchmarks.md, scale).
Pinning the threshold (``M_MMAP_THRESHOLD``; setting it also stops glibc from moving it) maps each allocation
past it on its own and unmaps it when it is freed. The process's owner opts in (the ``package`` command): it is
process-wide.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Past this, an allocation is mapped on its own: a layer's larger weights are, the many smaller tensors are not.
# A lower threshold lowers the peak further but costs time: every activation is then mapped and zeroed afresh.
THRESHOLD_BYTES = 16 * 2**20


def pin_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold; False where the C library is not glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
