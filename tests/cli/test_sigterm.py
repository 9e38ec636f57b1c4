"""`package` stopped by SIGTERM (what Kubernetes sends a pod before it kills it) at each stage.

SIGTERM is handled as SIGINT is: the command stops with exit 143 and one line, the earlier output it
would have replaced is byte-identical, and no hidden temp folder is left beside it. The stages are hit
two ways: in-process, by a signal the stage's own function sends (so the point is exact), and by a real
``kill`` of the console script from outside (so the installed handler is the one that runs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from serve_pruned.cli.main import cli

EXE = str(Path(sys.executable).parent / "serve-pruned")
INTERRUPTED = "interrupted (SIGTERM); earlier output is untouched and nothing half-written is left"


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _args(model: Path, out: Path, calib: Path, *extra: str, distill_steps: int = 2) -> list[str]:
    return ["package", str(model), "--out", str(out), "--overwrite", "--calib", str(calib), "--num-samples", "4",
            "--seq-len", "32", "--multiple-of", "32", "--target-params", "0.8", "--distill-steps", str(distill_steps),
            "--distill-samples", "16", "--distill-seq-len", "32", *extra]


# (module, function) each stage calls: the signal is sent from inside it
STAGES = {
    "loading": ("serve_pruned.compress.package", "load_model"),
    "distillation": ("serve_pruned.compress.distill", "distill"),
    "writing": ("serve_pruned.compress.write", "write_manifest"),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigterm_at_each_stage_keeps_the_earlier_output(stage, earlier_package, tiny_models, text_files,
                                                        tmp_path, monkeypatch):
    import importlib

    out = tmp_path / "out"
    shutil.copytree(earlier_package, out)
    before = tree(out)
    module = importlib.import_module(STAGES[stage][0])
    real = getattr(module, STAGES[stage][1])
    reached: list[str] = []

    def terminated_here(*args, **kwargs):
        reached.append(stage)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the handler raises here
        return real(*args, **kwargs)

    monkeypatch.setattr(module, STAGES[stage][1], terminated_here)
    r = CliRunner().invoke(cli, _args(tiny_models["llama"], out, text_files["calib"], "--no-progress"))
    assert reached == [stage]
    assert r.exit_code == 128 + signal.SIGTERM, r.output
    assert [ln for ln in r.stderr.splitlines() if ln.startswith(("error", "interrupted"))] == [INTERRUPTED]
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler is gone again


def _kill_when(proc: subprocess.Popen, ready, *, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the stage was never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)


@pytest.mark.parametrize("stage", ["distillation", "quantizing"])
def test_kill_of_the_console_script(stage, earlier_package, tiny_models, text_files, tmp_path):
    """A real `kill -TERM`: during distillation (its checkpoint folder appears), and while the W8A8 output is
    being written in its hidden temp folder."""
    out = tmp_path / "out"
    shutil.copytree(earlier_package, out)
    before = tree(out)
    cache = tmp_path / "cache"
    args = _args(tiny_models["llama"], out, text_files["calib"], "--no-progress", "--quant", "w8a8",
                 distill_steps=400 if stage == "distillation" else 0)
    env = {**os.environ, "SERVE_PRUNED_CACHE": str(cache)}
    proc = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if stage == "distillation":
            _kill_when(proc, lambda: any(cache.glob("recover/*/step-1/distill")))
        else:
            _kill_when(proc, lambda: any(tmp_path.glob(".out.tmp-*")))
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert INTERRUPTED in stderr.splitlines() and "Traceback" not in stderr
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]
