"""Shared bits of the benchmarks: local texts, machine description, writing a section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
# Local text shared by the benchmarks: Python's docs (Debian python3-doc) -- HOWTOs and FAQ to
# calibrate, the tutorial to evaluate -- and a licence as out-of-domain text. BENCH_DOCS names a copy of that
# folder on a machine without the package (the GPU check carries one).
DOCS = Path(os.environ["BENCH_DOCS"]) if os.environ.get("BENCH_DOCS") else next(
    Path("/usr/share/doc").glob("python3*/html/_sources"))
OOD = Path("/usr/share/common-licenses/GPL-3")
HEADER = """# Benchmarks

Every figure here was written by a script under `bench/`, together with the command that made it.
Figures inside one section were measured side by side in one run; do not compare across sections or
machines. Each section keeps the settings of the code it ran with (its last line names when, and from
late 2026-11-29 on, the commit); a section run before a default changed says so. Regenerate with `make bench`.
"""


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def code_version() -> str:
    """The commit the benchmark ran at, marked when the code in the work tree differed from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        # docs/ left out: an earlier benchmark of the same `make bench` has just rewritten docs/benchmarks.md
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)docs"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy without .git (the GPU machine's) may name it
        return f"commit {os.environ['BENCH_COMMIT']}" if os.environ.get("BENCH_COMMIT") else "an unknown commit"
    return f"commit {head}" + (" with local changes" if dirty else "")


def write_section(name: str, body: str, command: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"<!-- bench:{name} -->\n{body.strip()}\n\nCommand: `{command}`  \n"
             f"Machine: {machine()}; run {stamp} at {code_version()}.\n<!-- /bench:{name} -->")
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def bench_command() -> str:
    """How this benchmark was run: the `make bench` line with the script and its arguments."""
    return f"make bench  # .venv/bin/python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def publish(name: str, lines: list[str]) -> None:
    """Write ``lines`` as section ``name`` of docs/benchmarks.md, with the command that made them, and print them."""
    write_section(name, "\n".join(lines), bench_command())
    print("\n".join(lines))
