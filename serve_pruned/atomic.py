"""Atomic output folders: build beside the target, fsync, rename into place.

A failed run leaves the previous output (if any) untouched and no temp folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from serve_pruned.errors import OutputExistsError


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output(target: Path, *, overwrite: bool) -> None:
    """Fail early (before any heavy work) when ``target`` exists and may not be replaced."""
    if target.exists() and not overwrite:
        raise OutputExistsError(str(target))


@contextlib.contextmanager
def atomic_dir(target: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``target``; on success it becomes ``target``.

    The temp folder is a hidden sibling so the final rename stays on one filesystem. If the body
    raises, the temp folder is removed and ``target`` is untouched.
    """
    target = Path(target).resolve()
    check_output(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp sibling and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
