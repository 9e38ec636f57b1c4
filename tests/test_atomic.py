"""A failed write leaves the previous output intact and no temp folder behind."""

from __future__ import annotations

import pytest

from serve_pruned.atomic import atomic_dir
from serve_pruned.errors import OutputExistsError


def test_success_replaces_only_with_overwrite(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_dir(target) as tmp:
            pass
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_keeps_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "old").write_text("kept")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("boom")
    assert (target / "old").read_text() == "kept" and not (target / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
