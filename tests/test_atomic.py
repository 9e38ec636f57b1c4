"""The output rule and atomic writes: a failed write leaves the previous output intact and no temp behind;
nothing is replaced that the writer did not make."""

from __future__ import annotations

import os
import signal
import time

import pytest

from serve_pruned.atomic import Owner, atomic_dir, atomic_write_text, check_output, write_output_file
from serve_pruned.errors import OutputExistsError, OutputNotOwnedError, UsageError

# a writer whose own files are named out-*
OWNER = Owner("test output", lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith("out-"))
              if d.is_dir() else ([] if d.name.startswith("out-") else [d.name]))


def test_success_replaces_only_with_overwrite(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, owner=OWNER) as tmp:
        (tmp / "out-a").write_text("1")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_dir(target, owner=OWNER) as tmp:
            pass
    with atomic_dir(target, overwrite=True, owner=OWNER) as tmp:
        (tmp / "out-b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["out-b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_keeps_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, owner=OWNER) as tmp:
        (tmp / "out-old").write_text("kept")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True, owner=OWNER) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("boom")
    assert (target / "out-old").read_text() == "kept" and not (target / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_foreign_files_are_never_replaced_even_with_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "out-1").write_text("ours")
    (target / "notes.txt").write_text("theirs")
    with pytest.raises(OutputNotOwnedError, match=r"\(notes.txt\); nothing was changed") as e:
        with atomic_dir(target, overwrite=True, owner=OWNER):
            pytest.fail("the body must not run")
    assert e.value.foreign == ["notes.txt"] and "never replaced" in e.value.hint
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "out-1"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_empty_folder_is_written_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with atomic_dir(target, owner=OWNER) as tmp:
        (tmp / "out-a").write_text("1")
    assert [p.name for p in target.iterdir()] == ["out-a"]


@pytest.mark.parametrize("where", ["", ".", "..", "/", "~"])
def test_root_like_and_empty_paths_are_refused(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="empty|filesystem root|home|current folder|parent of the current"):
        check_output(where, overwrite=True, owner=OWNER)


def test_a_file_where_a_folder_goes_and_the_reverse(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputNotOwnedError, match="is a file, not a folder"):
        check_output(tmp_path / "f", overwrite=True, owner=OWNER)
    with pytest.raises(OutputNotOwnedError, match="is a folder, not a file"):
        write_output_file(tmp_path, "x", overwrite=True, owner=OWNER)
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output(tmp_path / "f" / "sub", overwrite=True, owner=OWNER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_unwritable_parent_is_refused_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="is not writable"):
        check_output("/proc/serve-pruned-test/out", overwrite=False, owner=OWNER)


def test_output_file_rule(tmp_path):
    target = tmp_path / "sub" / "out-file"
    write_output_file(target, "1", overwrite=False, owner=OWNER)  # parents are made
    with pytest.raises(OutputExistsError, match="output file .* already exists"):
        write_output_file(target, "2", overwrite=False, owner=OWNER)
    write_output_file(target, "2", overwrite=True, owner=OWNER)
    assert target.read_text() == "2"
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("mine")
    with pytest.raises(OutputNotOwnedError):
        write_output_file(theirs, "x", overwrite=True, owner=OWNER)
    assert theirs.read_text() == "mine"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out-file"]


def test_atomic_write_text_leaves_no_temp_on_failure(tmp_path):
    with pytest.raises(IsADirectoryError):
        atomic_write_text(tmp_path, "x")  # os.replace onto a folder fails
    assert list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*")) == []


@pytest.mark.parametrize("other_thread", [False, True], ids=["alone", "beside a thread"])
def test_a_signal_during_the_swap_waits_until_it_is_done(tmp_path, monkeypatch, other_thread):
    """SIGTERM that lands while the old output is swapped for the new is held back until both renames and the
    clean-up are done, so neither a half swap nor the .old folder is ever left. Also when another thread (as
    torch and tqdm start) is there to receive the signal: a blocked signal mask in the main thread alone
    would not hold it then."""
    import threading

    stop = threading.Event()
    if other_thread:
        threading.Thread(target=stop.wait, daemon=True).start()
    target = tmp_path / "out"
    with atomic_dir(target, owner=OWNER) as tmp:
        (tmp / "out-old").write_text("1")
    got: list[int] = []
    real_replace = os.replace

    def replace_then_signal(a, b):
        real_replace(a, b)
        if not got:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # time for the signal to land on whichever thread takes it
            assert not got  # held: it does not run between the two renames

    previous = signal.signal(signal.SIGTERM, lambda s, _f: got.append(s))
    try:
        monkeypatch.setattr(os, "replace", replace_then_signal)
        with atomic_dir(target, overwrite=True, owner=OWNER) as tmp:
            (tmp / "out-new").write_text("2")
        monkeypatch.undo()
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
    assert got == [signal.SIGTERM]  # delivered once the swap was done
    assert [p.name for p in target.iterdir()] == ["out-new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
