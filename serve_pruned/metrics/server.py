"""Running the exporter: an HTTP endpoint on a registry of its own."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server

from serve_pruned.errors import UsageError
from serve_pruned.metrics.exporter import ExporterCollector, Target, load_targets, planner_for
from serve_pruned.serving.memory import DEFAULT_CONCURRENCY, DEFAULT_MAX_MODEL_LEN


def start_exporter(targets: Iterable[Target] | Callable[[], Iterable[Target]], *, host: str = "127.0.0.1",
                   port: int = 9400, timeout: float = 2.0, max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                   concurrency: int = DEFAULT_CONCURRENCY,
                   device: str = "cpu") -> tuple[Any, CollectorRegistry]:
    """Start the /metrics endpoint in a daemon thread; returns (server, registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(targets, timeout=timeout,
                                        predicted_bytes=planner_for(max_model_len, concurrency, device)))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"the exporter cannot listen on {host}:{port} ({exc.strerror or exc})",
                         hint="pick another --port (another process holds this one)") from exc
    return server, registry


def run_exporter(targets_file: Path, *, host: str, port: int, timeout: float, max_model_len: int,
                 concurrency: int, log: Callable[[str], None]) -> None:
    """Foreground exporter for `serve-pruned metrics exporter`; the targets file is re-read on change."""
    state: dict[str, Any] = {"mtime": None, "targets": []}

    def targets() -> list[Target]:
        mtime = targets_file.stat().st_mtime
        if mtime != state["mtime"]:
            state["targets"], state["mtime"] = load_targets(targets_file), mtime
        return state["targets"]

    targets()  # a bad file fails now, with its one-line error
    server, _registry = start_exporter(targets, host=host, port=port, timeout=timeout,
                                       max_model_len=max_model_len, concurrency=concurrency)
    log(f"exporter listening on http://{host}:{port}/metrics ({len(state['targets'])} target(s))")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_a: stop.set())
    stop.wait()
    server.shutdown()
