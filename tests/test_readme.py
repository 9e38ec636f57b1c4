"""The README's promises that code can check."""

from __future__ import annotations

import re
from pathlib import Path

from serve_pruned.model.arch import SUPPORTED

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert [ln.split("#")[0].strip() for ln in block.strip().splitlines()] == ["make demo", "make test"]


def test_support_table_matches_the_code():
    rows = re.findall(r"^\| (\w+ForCausalLM) \| (yes|no) \| (yes|no) \|", README, re.M)
    assert {arch: (heads == "yes", hidden == "yes") for arch, heads, hidden in rows} == {
        s.architecture: (s.prune_heads, s.prune_hidden) for s in SUPPORTED.values()
    }


def test_every_flag_the_readme_shows_exists():
    """Each `serve-pruned <command>` line in the README uses only options that command has."""
    import shlex

    import click

    from serve_pruned.cli.main import cli

    text = README.replace("\\\n", " ")
    lines = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()
             if ln.strip().startswith("serve-pruned ")]
    assert len(lines) > 10
    for line in lines:
        args = shlex.split(line.split(" #")[0])[1:]
        cmd: click.Command = cli
        while isinstance(cmd, click.Group) and args and args[0] in cmd.commands:
            cmd, args = cmd.commands[args[0]], args[1:]
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]
        assert not unknown, f"{line!r}: {unknown}"
