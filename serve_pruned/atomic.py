"""Safe outputs: one rule for every command that writes, and atomic folder and file writes.

The rule: a command never deletes or replaces what it did not create. An existing target is replaced
only with ``--overwrite``, and even then only when it is empty or every entry in it is recognised as
that command's own earlier output (``Owner.foreign`` lists what is not). Empty, root-like and
unwritable targets are refused before any heavy work.

Writes build beside the target, fsync, and rename into place. A failed or interrupted run (SIGINT, or
SIGTERM, which the CLI turns into the same interrupt) leaves the previous output untouched and no temp
folder behind: the swap and the clean-up run with those signals held back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from serve_pruned.errors import OutputExistsError, OutputNotOwnedError, UsageError

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class Owner:
    """How one writer recognises its own earlier output.

    Attributes:
        what: what the output is, for messages ("packaged model", "rendered manifests").
        foreign: the entries of an existing folder (or the existing file itself) that this writer did not
            write; empty when all of it is its own.
    """

    what: str
    foreign: Callable[[Path], list[str]]


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (delivered on exit) so a rename-and-clean-up is never cut in half.

    The handlers are swapped, not the signal mask: a mask is per thread, and a signal sent to the process goes
    to any thread that does not block it (torch's worker threads, a progress bar's monitor), whose arrival then
    runs the Python handler in the main thread anyway. Python runs every handler in the main thread, so one
    that only records the signal holds it wherever it lands; the signal is raised again once the block is done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _frame: pending.append(s)) for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for received in dict.fromkeys(pending):  # once each, in the order they came
            signal.raise_signal(received)


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


def _root_like(target: Path) -> str | None:
    """Why ``target`` (resolved) may never be an output: the filesystem root, home, or the working folder
    or one of its parents (replacing those would take the user's other files with them)."""
    if target == Path(target.anchor):
        return "the filesystem root"
    if target == Path.home().resolve():
        return "your home folder"
    cwd = Path.cwd().resolve()
    if target == cwd:
        return "the current folder"
    if target in cwd.parents:
        return "a parent of the current folder"
    return None


def _probe_writable(target: Path) -> None:
    """Create (and remove) a temp folder where the output's temp folder will go, or say why not."""
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {target}: {parent} is a file, not a folder",
                         hint="choose an output path whose parent folders are folders")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=parent))
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {parent} is not writable ({exc.strerror})",
                         hint="choose another output folder, or fix its permissions") from exc


def check_output(target: Path | str, *, overwrite: bool, owner: Owner, folder: bool = True) -> Path:
    """Refuse, before any heavy work, a target this run may not write; returns it resolved.

    Refused: an empty path, the filesystem root, home, the current folder or its parents; an existing
    target without ``overwrite`` (an empty folder is fine); an existing target holding anything
    ``owner`` did not write, even with ``overwrite``; a file where a folder goes or the reverse; an
    unwritable place.
    """
    if str(target).strip() == "":
        raise UsageError("the output path is empty, which would mean the current folder",
                         hint="name a new folder, e.g. --out out/my-model")
    path = Path(target).expanduser().resolve()
    why = _root_like(path)
    if why is not None:
        raise UsageError(f"refusing to write the output to {path}: it is {why}",
                         hint="name a new folder for the output, e.g. out/my-model")
    if path.is_symlink() or path.exists():
        if folder and not path.is_dir():
            raise OutputNotOwnedError(str(path), owner.what, [path.name], kind="a file, not a folder")
        if not folder and path.is_dir():
            raise OutputNotOwnedError(str(path), owner.what, [path.name], kind="a folder, not a file")
        empty = folder and not any(path.iterdir())
        if not empty:
            if not overwrite:
                raise OutputExistsError(str(path), kind="folder" if folder else "file")
            foreign = owner.foreign(path)
            if foreign:
                raise OutputNotOwnedError(str(path), owner.what, foreign)
    _probe_writable(path)
    return path


@contextlib.contextmanager
def atomic_dir(target: Path | str, *, overwrite: bool = False, owner: Owner) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``target``; on success it becomes ``target``.

    ``target`` is checked by :func:`check_output` first. The temp folder is a hidden sibling so the final
    rename stays on one filesystem. If the body raises (or is interrupted), the temp folder is removed
    and ``target`` is untouched.
    """
    target = check_output(target, overwrite=overwrite, owner=owner)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        with signals_held():
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
    except BaseException:
        with signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write a file via a temp sibling and rename; on failure no temp file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        with signals_held():
            os.replace(tmp, path)
    except BaseException:
        with signals_held():
            tmp.unlink(missing_ok=True)
        raise


def write_output_file(path: Path | str, text: str, *, overwrite: bool, owner: Owner) -> Path:
    """One output file under the rule: checked like a folder output, parents made, written atomically."""
    target = check_output(path, overwrite=overwrite, owner=owner, folder=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, text)
    return target
