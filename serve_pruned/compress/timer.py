"""Seconds and peak memory per pipeline stage, for the manifest and the report (instead of hand-written pairs).

A stage's host peak is the largest resident set size seen while it ran, sampled every 20 ms by a thread (the
kernel's high-water mark could be reset per stage, but that would hide the run's true peak from ``time -v``
and ``getrusage``), with its anonymous part beside it: pages of mapped files count in RSS but the kernel may
drop them at any time (this machine kind reclaims them proactively), so RSS alone varies from run to run.
The device peak is torch's CUDA allocator high-water mark, reset per stage. Both are left out where they
cannot be read.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_EVERY_S = 0.02


def _rss() -> tuple[int, int] | None:
    """Resident bytes, and the anonymous part of them (what is not a page of a mapped file)."""
    try:
        fields = _STATM.read_text().split()
        resident, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None
    return resident, resident - shared


class _Sampler:
    """The largest RSS (and anonymous RSS) seen between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self._peak: tuple[int, int] | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _see(self) -> None:
        now = _rss()
        if now is not None:
            self._peak = now if self._peak is None else (max(self._peak[0], now[0]), max(self._peak[1], now[1]))

    def start(self) -> None:
        self._see()
        if self._peak is None:
            return
        self._done.clear()
        self._thread = threading.Thread(target=self._run, name="serve-pruned-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(_EVERY_S):
            self._see()

    def stop(self) -> tuple[int, int] | None:
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self._thread = None
        self._see()
        return self._peak


def _cuda() -> object | None:
    torch = sys.modules.get("torch")  # never imported for this: a torch-free stage has no device memory
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class Timer:
    """Seconds per stage, summed over the pruning steps when a stage runs once per step, and each stage's
    peak host and device bytes (the largest over its runs)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.started = clock()
        self.seconds: dict[str, float] = {}
        self.peak_host: dict[str, int] = {}
        self.peak_host_anon: dict[str, int] = {}  # without mapped file pages, which the kernel can drop
        self.peak_device: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = self._clock()
        sampler = _Sampler()
        sampler.start()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()  # type: ignore[attr-defined]
        try:
            yield
        finally:
            self.add(stage, self._clock() - t)
            peak = sampler.stop()
            if peak is not None:
                self.peak_host[stage] = max(self.peak_host.get(stage, 0), peak[0])
                self.peak_host_anon[stage] = max(self.peak_host_anon.get(stage, 0), peak[1])
            cuda = cuda or _cuda()
            if cuda is not None:
                used = int(cuda.max_memory_allocated())  # type: ignore[attr-defined]
                self.peak_device[stage] = max(self.peak_device.get(stage, 0), used)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def elapsed(self) -> float:
        return self._clock() - self.started

    def as_manifest(self) -> dict[str, float]:
        """``{"load_s": 12.3, ...}`` in the order the stages first ran."""
        return {f"{k}_s": round(v, 2) for k, v in self.seconds.items()}

    def memory_manifest(self) -> dict[str, dict[str, float]]:
        """``{"host_gib": {"score": 2.1, ...}, "host_anon_gib": ..., "device_gib": ...}``: each stage's peak, where it
        was measured."""
        out = {}
        for key, peaks in (("host_gib", self.peak_host), ("host_anon_gib", self.peak_host_anon),
                           ("device_gib", self.peak_device)):
            if peaks:
                out[key] = {k: round(v / 2**30, 3) for k, v in peaks.items()}
        return out
