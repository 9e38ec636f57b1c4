"""Seconds per pipeline stage, for the manifest and the report (instead of hand-written perf_counter pairs)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class Timer:
    """Seconds per stage, summed over the pruning steps when a stage runs once per step."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.started = clock()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = self._clock()
        try:
            yield
        finally:
            self.add(stage, self._clock() - t)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def elapsed(self) -> float:
        return self._clock() - self.started

    def as_manifest(self) -> dict[str, float]:
        """``{"load_s": 12.3, ...}`` in the order the stages first ran."""
        return {f"{k}_s": round(v, 2) for k, v in self.seconds.items()}
