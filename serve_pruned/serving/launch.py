"""`serve-pruned serve`: co-located vLLM instances sized by the planner, started one at a time.

Each instance waits for /health before the next starts (vLLM's start-up memory check must see the
previous instance's real footprint). Instance i listens on port P+i. SIGINT/SIGTERM stop them all;
an instance that dies on its own is reported and the others keep serving.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_pruned.cache import pulled_dir
from serve_pruned.errors import UsageError, VLLMStartError
from serve_pruned.manifest import MANIFEST_NAME
from serve_pruned.model.config import read_config
from serve_pruned.serving.memory import DEFAULT_CONCURRENCY, DEFAULT_MAX_MODEL_LEN, ModelFootprint, Plan, plan
from serve_pruned.serving.vllm import VLLMServer, find_serve_python, port_free, serve_dtype

Log = Callable[[str], None]


@dataclass
class ServeOptions:
    model: str
    instances: int | None = 1
    port: int = 8000
    host: str = "127.0.0.1"
    device: str = "cpu"
    gpu: str | None = None
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    concurrency: int = DEFAULT_CONCURRENCY
    kv_cache_dtype: str = "auto"
    serve_python: str | None = None
    startup_timeout: float = 600.0
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if self.instances is not None and self.instances < 1:
            raise UsageError(f"--instances must be at least 1, got {self.instances}",
                             hint="pass how many co-located instances to start, e.g. --instances 2")
        last = self.port + (self.instances or 1) - 1
        if not 1 <= self.port <= last <= 65535:
            raise UsageError(f"ports {self.port}..{last} are not all valid TCP ports (1..65535)",
                             hint="pick a lower --port (instance i listens on PORT+i)")
        if self.metrics_port is not None and self.port <= self.metrics_port <= last:
            raise UsageError(f"--metrics-port {self.metrics_port} is one of the instances' ports "
                             f"{self.port}..{last}", hint="pick a --metrics-port outside that range")


def resolve_model_dir(spec: str, *, token: str | None = None, log: Log = lambda _m: None) -> Path:
    """A local folder as is; ``owner/name[@revision]`` pulled (verified) into the cache once."""
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or "/" not in spec:
        if not (path / "config.json").is_file():
            raise UsageError(f"{spec} is not a model folder (no config.json)",
                             hint="pass a packaged folder or REPO_ID@REVISION")
        return path
    from serve_pruned.hub.transfer import parse_repo_spec, pull

    repo_id, revision = parse_repo_spec(spec)
    dest = pulled_dir(repo_id, revision)
    if not (dest / MANIFEST_NAME).is_file():
        pull(spec, dest, token=token, overwrite=True, log=log)
    return dest


def plan_for(opts: ServeOptions, model_dir: Path) -> Plan:
    device = "cpu" if opts.device == "cpu" else (opts.gpu or "")
    if not device:
        raise UsageError("--device cuda needs --gpu TYPE to size instances in bytes", hint="e.g. --gpu H100-80GB")
    return plan(ModelFootprint.from_folder(model_dir), device=device, max_model_len=opts.max_model_len,
                concurrency=opts.concurrency, instances=opts.instances, kv_cache_dtype=opts.kv_cache_dtype)


class Fleet:
    """The running instances of one `serve` call."""

    def __init__(self, model_dir: Path, the_plan: Plan, opts: ServeOptions) -> None:
        self.model_dir = model_dir
        self.plan = the_plan
        self.opts = opts
        self.servers: list[VLLMServer] = []

    def start(self, log: Log = lambda _m: None) -> Fleet:
        python = find_serve_python(self.opts.serve_python)
        ports = [self.opts.port + i for i in range(self.plan.instances)]
        taken = [p for p in ports if not port_free(p, self.opts.host)]
        if taken:
            raise VLLMStartError(f"port(s) {', '.join(map(str, taken))} already in use",
                                 hint="pick another --port (instance i listens on PORT+i)")
        if self.opts.metrics_port is not None and not port_free(self.opts.metrics_port, self.opts.host):
            raise VLLMStartError(f"--metrics-port {self.opts.metrics_port} is already in use",
                                 hint="pick another --metrics-port")
        dtype = serve_dtype(read_config(self.model_dir))
        flags = dict(self.plan.instance.flags)
        max_len = int(flags.pop("--max-model-len"))
        args = [a for kv in flags.items() for a in kv]
        try:
            for i, port in enumerate(ports):
                t = time.perf_counter()
                server = VLLMServer(str(self.model_dir), port, host=self.opts.host, args=args,
                                    env=dict(self.plan.instance.env), serve_python=python, dtype=dtype,
                                    max_model_len=max_len)
                self.servers.append(server)
                server.start(timeout=self.opts.startup_timeout)
                log(f"instance {i} ready at {server.url} (pid {server.proc.pid if server.proc else '?'}, "
                    f"{time.perf_counter() - t:.0f} s)")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def alive(self) -> list[VLLMServer]:
        return [s for s in self.servers if s.proc is not None and s.proc.poll() is None]

    def describe(self) -> list[dict[str, Any]]:
        return [{"instance": i, "url": s.url, "pid": s.proc.pid if s.proc else None, "log": str(s.log_path)}
                for i, s in enumerate(self.servers)]

    def wait(self, log: Log = lambda _m: None) -> int:
        """Block until a signal stops the fleet (exit 0) or every instance has died (exit 1)."""
        stopping: list[int] = []

        def on_signal(signum: int, _frame: Any) -> None:
            stopping.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        reported: set[int] = set()
        try:
            while not stopping:
                for i, s in enumerate(self.servers):
                    if i not in reported and s.proc is not None and s.proc.poll() is not None:
                        reported.add(i)
                        log(f"instance {i} at {s.url} exited with code {s.proc.returncode}; the others keep "
                            f"serving (log: {s.log_path})")
                if not self.alive():
                    log("every instance has exited")
                    return 1
                time.sleep(0.5)
            log(f"stopping {len(self.alive())} instance(s)")
            return 0
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
