"""The README's promises that code can check."""

from __future__ import annotations

import re
from pathlib import Path

from serve_pruned.compress.arch import SUPPORTED

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert [ln.split("#")[0].strip() for ln in block.strip().splitlines()] == ["make demo", "make test"]


def test_support_table_matches_the_code():
    rows = re.findall(r"^\| (\w+ForCausalLM) \| (yes|no) \|", README, re.M)
    assert {arch: heads == "yes" for arch, heads in rows} == {
        s.architecture: s.prune_heads for s in SUPPORTED.values()
    }
