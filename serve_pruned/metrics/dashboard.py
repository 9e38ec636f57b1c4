"""The Grafana dashboard, built as data: its source of truth. `serve-pruned metrics dashboard` writes it;
deploy/grafana/serve-pruned.json is that output, checked by a test (regenerate, diff)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serve_pruned.atomic import Owner

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'


def _panel(pid: int, title: str, targets: list[tuple[str, str]], *, unit: str, x: int, y: int, w: int = 12,
           h: int = 8, kind: str = "timeseries", stack: bool = False, description: str = "") -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if kind == "timeseries":
        defaults["custom"] = {"stacking": {"mode": "normal" if stack else "none", "group": "A"},
                              "fillOpacity": 30 if stack else 0}
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": ({"legend": {"showLegend": True, "displayMode": "table", "placement": "bottom",
                                "calcs": ["lastNotNull"]}}
                    if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                                    "values": False}}),
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
                    for i, (expr, legend) in enumerate(targets)],
    }


def panels() -> list[dict[str, Any]]:
    return [
        _panel(1, "Memory per instance, by kind", [
            (f"serve_pruned_instance_memory_bytes{{{MODEL}}}", "{{vllm_instance}} {{kind}}")],
            unit="bytes", x=0, y=0, stack=False,
            description="weights and kv_cache from the manifest and vLLM; process_gpu from NVML; "
                        "process_rss from the OS"),
        _panel(2, "Predicted vs measured memory per instance", [
            (f"serve_pruned_instance_predicted_memory_bytes{{{MODEL}}}", "{{vllm_instance}} predicted"),
            (f"max without (source) (serve_pruned_instance_measured_memory_bytes{{{MODEL}}})",
             "{{vllm_instance}} measured")], unit="bytes", x=12, y=0),
        _panel(3, "Instances per GPU (co-location density)", [
            ("serve_pruned_gpu_instances", "{{node}} gpu {{gpu}}")], unit="short", x=0, y=8, w=8, kind="stat"),
        _panel(4, "More instances that would fit", [
            (f"serve_pruned_gpu_additional_instances{{{MODEL}}}", "{{node}} gpu {{gpu}} {{model}}")],
            unit="short", x=8, y=8, w=8, kind="stat"),
        _panel(5, "Weight bytes vs original", [
            (f"serve_pruned_model_weight_bytes_ratio{{{MODEL}}}", "{{model}}")], unit="percentunit", x=16, y=8, w=8,
            kind="stat"),
        _panel(6, "GPU memory: used and headroom", [
            ("serve_pruned_gpu_memory_used_bytes", "{{node}} gpu {{gpu}} used"),
            ("serve_pruned_gpu_memory_headroom_bytes", "{{node}} gpu {{gpu}} headroom")],
            unit="bytes", x=0, y=16, stack=True),
        _panel(7, "KV cache usage", [
            (f"serve_pruned_instance_kv_cache_usage_ratio{{{MODEL}}}", "{{vllm_instance}}")],
            unit="percentunit", x=12, y=16),
        _panel(8, "Requests running and waiting", [
            (f"serve_pruned_instance_requests_running{{{MODEL}}}", "{{vllm_instance}} running"),
            (f"serve_pruned_instance_requests_waiting{{{MODEL}}}", "{{vllm_instance}} waiting")],
            unit="short", x=0, y=24),
        _panel(9, "Latency p95 (vLLM: end to end, time to first token)", [
            ("histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:e2e_request_latency_seconds_bucket[5m])))",
             "{{model_name}} e2e"),
            ("histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket[5m])))",
             "{{model_name}} TTFT")], unit="s", x=12, y=24,
            description="From vLLM's own /metrics, scraped by Prometheus directly (PodMonitor / scrape config)"),
        _panel(10, "Instances up", [(f"serve_pruned_instance_up{{{MODEL}}}", "{{vllm_instance}}")],
               unit="short", x=0, y=32, w=24, h=6),
    ]


def dashboard() -> dict[str, Any]:
    return {
        "uid": "serve-pruned",
        "title": "serve_pruned: memory per instance and co-location density",
        "tags": ["serve-pruned", "vllm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
            {"name": "model", "type": "query", "datasource": DATASOURCE, "label": "Model", "includeAll": True,
             "multi": True, "refresh": 2, "query": {"query": "label_values(serve_pruned_instance_up, model)",
                                                    "refId": "model"},
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def queries() -> list[str]:
    """Every PromQL expression on the dashboard, with template variables filled in (for promtool)."""
    return [t["expr"].replace("$model", ".*") for p in panels() for t in p["targets"]]


def _not_our_dashboard(path: Path) -> list[str]:
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("uid") == dashboard()["uid"]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    return [] if ours else [path.name]


# `metrics dashboard -o FILE --overwrite` replaces only a dashboard it wrote (same uid).
DASHBOARD_OWNER = Owner("Grafana dashboard of serve-pruned", _not_our_dashboard)
