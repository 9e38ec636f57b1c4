"""`serve-pruned serve` start-up failures: one line naming the reason, exit 1, nothing left running."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from serve_pruned.serving.vllm import failure_reason, free_port

EXE = str(Path(sys.executable).parent / "serve-pruned")


def serve(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, "serve", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]


def test_failure_reason_prefers_the_root_cause():
    log = ("(Worker) ERROR RuntimeError: Unsupported CPU attention configuration: head_dim=16\n"
           "(EngineCore) ERROR RuntimeError: Worker failed with error 'x', please check the stack trace\n"
           "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert failure_reason(log) == "RuntimeError: Unsupported CPU attention configuration: head_dim=16"
    assert failure_reason("OSError: [Errno 98] Address already in use\n") .startswith("Errno 98")
    assert failure_reason("/bin/python: No module named vllm\n") == "No module named vllm"


def test_port_in_use_is_refused_before_starting(tiny_models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = serve(str(tiny_models["llama"]), "--port", str(port))
    assert proc.returncode == 1
    assert errors(proc) == [f"error: port(s) {port} already in use; pick another --port (instance i listens on "
                            "PORT+i)"]


def test_more_instances_than_memory_allows(tiny_models):
    proc = serve(str(tiny_models["llama"]), "--instances", "500", "--port", str(free_port()))
    assert proc.returncode == 1
    assert "500 instances need" in errors(proc)[0] and "at most" in errors(proc)[0]


def test_missing_serving_environment_says_what_to_run(tiny_models, tmp_path):
    proc = serve(str(tiny_models["llama"]), "--serve-python", str(tmp_path / "nope" / "python"))
    assert proc.returncode == 1
    assert "make setup-serve" in errors(proc)[0]


@pytest.mark.vllm
def test_vllm_start_failure_reports_the_reason_from_its_log(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 512  # the weights hold 256: vLLM fails while loading them
    (bad / "config.json").write_text(json.dumps(cfg))
    port = free_port()
    proc = serve(str(bad), "--port", str(port), "--max-model-len", "256")
    assert proc.returncode == 1
    (line,) = errors(proc)
    assert line.startswith(f"error: vLLM exited with code 1 while starting {bad}: ")
    assert "exceeds dimension size (256)" in line  # the root cause, not vLLM's wrapper
    assert "Engine core initialization failed" not in line
    assert "full log:" in line
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing left listening


@pytest.mark.vllm
def test_a_clean_stop_leaves_no_vllm_log_behind(tiny_models, text_files, tmp_path):
    """vLLM's output goes to a temp file while it runs (a failure names it); a clean stop removes it. The package
    served carries a manifest as the previous release wrote it (format 1): it still serves."""
    from test_manifest import as_format_1

    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    out = package(PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "p", keep_ffn=128, multiple_of=32,
                                 calib=(str(text_files["calib"]),), num_samples=4, seq_len=32, recover=False),
                  progress=False).out
    as_format_1(out)
    tmp = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: vLLM puts unix sockets in it (107 bytes at most)
    proc = serve(str(out), "--port", str(free_port()), "--max-model-len", "256", "--prompt", "The",
                 "--format", "json", env={"TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    (instance,) = json.loads(proc.stdout)["instances"]
    assert Path(instance["log"]).parent.parent == tmp and not Path(instance["log"]).exists()
    assert list(tmp.iterdir()) == []  # vLLM's own sockets and scratch files went with its folder
    tmp.rmdir()
