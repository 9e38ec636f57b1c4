"""Progress bars on stderr for every stage longer than a few seconds."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, desc: str, enabled: bool, *, unit: str = "seq") -> Any:
    """A progress bar on stderr; use it as a context manager so it is closed on failure too."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)
