"""Where serve_pruned keeps reusable work (converted example model, importance statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SERVE_PRUNED_CACHE``, else ``$XDG_CACHE_HOME/serve_pruned``, else ``~/.cache/serve_pruned``."""
    env = os.environ.get("SERVE_PRUNED_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "serve_pruned"


def pulled_dir(repo_id: str, revision: str | None) -> Path:
    """Where `serve REPO@REV` keeps the verified pull it serves from (and `deploy render` sizes from)."""
    return cache_root() / "pulled" / f"{repo_id.replace('/', '--')}@{revision or 'main'}"
