"""Each stage's seconds and its own peak memory, without disturbing the run's high-water mark."""

from __future__ import annotations

import resource
import sys
import time

import pytest

from serve_pruned.compress.timer import Timer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


def test_each_stage_reports_its_own_peak():
    timer = Timer()
    with timer("big"):
        block = bytearray(400 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page, so it is resident
        time.sleep(0.1)
        del block
    with timer("small"):
        time.sleep(0.1)
    with timer("small"):  # a stage that runs twice keeps its larger peak and sums its time
        time.sleep(0.05)
    big, small = timer.peak_host["big"], timer.peak_host["small"]
    assert big - small > 350 * 2**20
    assert timer.seconds["small"] >= 0.15
    assert timer.memory_manifest()["host_gib"]["big"] == round(big / 2**30, 3)
    assert timer.peak_host_anon["big"] - timer.peak_host_anon["small"] > 350 * 2**20  # a bytearray is anonymous
    # the process's own high-water mark is untouched: it still holds the big stage's peak
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 >= big * 0.95
