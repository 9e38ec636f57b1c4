"""Prometheus exporter: memory per vLLM instance and co-location density.

Reconciles three views of each instance: what the package manifest predicts (weights, KV bytes per
token, the planner's total), what vLLM reports (``cache_config_info``, KV usage, queue), and what the
machine measures (per-process GPU memory from NVML; RSS of the process tree on CPU).

Every scrape of the exporter scrapes all targets concurrently, each with its own timeout, so one
slow or dead vLLM costs at most ``timeout`` and shows as ``up 0`` instead of failing the scrape.
Collectors are registered on a registry passed in; nothing is registered at import.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from serve_pruned.errors import ManifestError
from serve_pruned.manifest import MANIFEST_NAME, Manifest, read_manifest
from serve_pruned.metrics.vllm_metrics import DEFAULT_VERSION, MetricsFormatError, VllmSample, parse

log = logging.getLogger(__name__)

PREFIX = "serve_pruned"


@dataclass
class Target:
    """One vLLM instance to watch.

    Attributes:
        name: the ``vllm_instance`` label (defaults to the URL's host:port). Not ``instance``: Prometheus
            owns that label (the scrape target) and would rename ours to ``exported_instance``.
        url: base URL of the vLLM server.
        model_dir: the packaged folder it serves (manifest, config) -- the ``model`` label is its name.
        pid: the server's process id (RSS and NVML per-process memory), when known.
        gpu: GPU index it runs on ("cpu" when on the CPU).
    """

    url: str
    model_dir: str
    name: str = ""
    pid: int | None = None
    gpu: str = "cpu"
    manifest: Manifest | None = None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.name = self.name or self.url.split("://", 1)[-1]
        if self.manifest is None and (Path(self.model_dir) / MANIFEST_NAME).is_file():
            try:
                self.manifest = read_manifest(Path(self.model_dir))
            except ManifestError as exc:  # the exporter keeps serving what vLLM and the machine report
                log.warning("no manifest metrics for %s: %s", self.model_dir, exc)

    @property
    def model(self) -> str:
        return Path(self.model_dir).name


def load_targets(path: str | Path) -> list[Target]:
    """Targets from a YAML/JSON file: a list of {url, model_dir, name?, pid?, gpu?}."""
    import yaml

    from serve_pruned.errors import UsageError, yaml_problem

    hint = "write a YAML list of {url, model_dir, name?, pid?, gpu?} entries, one per vLLM instance"
    try:
        rows = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read targets file {path} ({exc.strerror})", hint=hint) from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"targets file {path} is not UTF-8 text", hint=hint) from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"targets file {path} is {yaml_problem(exc)}", hint=hint) from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "url" in r and "model_dir" in r for r in rows):
        raise UsageError(f"{path} must be a list of {{url, model_dir, name?, pid?, gpu?}} entries", hint=hint)
    return [Target(**{k: r[k] for k in ("url", "model_dir", "name", "pid", "gpu") if k in r}) for r in rows]


def process_tree_rss(pid: int) -> int | None:
    """RSS in bytes of ``pid`` and its descendants, from /proc (no psutil needed)."""
    def children(p: int) -> list[int]:
        out: list[int] = []
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                out += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
        return out

    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            if p == pid:
                return None
            continue
        stack += children(p)
    return total


class Nvml:
    """Per-process GPU memory and per-GPU totals from NVML; ``available`` is False without a GPU/driver."""

    def __init__(self) -> None:
        self.available = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self.available = True
        except Exception:  # no library, no driver, no GPU: all mean "absent"
            self._nv = None

    def gpus(self) -> dict[str, tuple[int, int]]:
        """index -> (used, total) bytes."""
        if not self.available:
            return {}
        nv = self._nv
        out: dict[str, tuple[int, int]] = {}
        for i in range(nv.nvmlDeviceGetCount()):
            mem = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i))
            out[str(i)] = (int(mem.used), int(mem.total))
        return out

    def process_memory(self) -> dict[int, int]:
        """host pid -> GPU bytes, over every GPU."""
        if not self.available:
            return {}
        nv = self._nv
        out: dict[int, int] = {}
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                out[int(proc.pid)] = out.get(int(proc.pid), 0) + int(proc.usedGpuMemory or 0)
        return out


@dataclass
class ScrapeResult:
    up: bool
    sample: VllmSample | None
    seconds: float
    error: str = ""


def scrape(target: Target, *, timeout: float) -> ScrapeResult:
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(f"{target.url}/metrics", timeout=timeout) as r:
            text = r.read().decode("utf-8", errors="replace")
        sample = parse(text, kv_bytes_per_token=target.manifest.kv_cache_bytes_per_token if target.manifest else None,
                       version=DEFAULT_VERSION)
        return ScrapeResult(True, sample, time.perf_counter() - t)
    except MetricsFormatError as exc:  # reachable but unreadable: up, with no vLLM figures
        return ScrapeResult(True, None, time.perf_counter() - t, str(exc))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return ScrapeResult(False, None, time.perf_counter() - t, str(exc))


Planner = Callable[[Target], int | None]


class ExporterCollector(Collector):
    """Collects every ``serve_pruned_*`` series from the targets on each scrape.

    Args:
        targets: the instances to watch (a callable returning them, for fleets that change).
        timeout: per-target scrape timeout in seconds.
        nvml: an :class:`Nvml` (or a stand-in with the same methods); created when None.
        predicted_bytes: per target, the planner's bytes for one instance (None when unknown).
        node: the ``node`` label.
        host_memory: (used, total) bytes of the host, for CPU "GPUs".
    """

    def __init__(self, targets: Iterable[Target] | Callable[[], Iterable[Target]], *, timeout: float = 2.0,
                 nvml: Nvml | None = None, predicted_bytes: Planner | None = None, node: str | None = None,
                 host_memory: Callable[[], tuple[int, int]] | None = None) -> None:
        self._targets = targets
        self.timeout = timeout
        self.nvml = nvml if nvml is not None else Nvml()
        self.predicted_bytes = predicted_bytes or (lambda _t: None)
        self.node = node or os.uname().nodename
        self.host_memory = host_memory or _host_memory
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="sp-scrape")

    def targets(self) -> list[Target]:
        return list(self._targets() if callable(self._targets) else self._targets)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One concurrent scrape of every target, then the per-instance, per-GPU and per-node families."""
        targets = self.targets()
        results = list(self._pool.map(lambda t: scrape(t, timeout=self.timeout), targets))
        per_gpu: dict[str, list[tuple[Target, ScrapeResult]]] = {}
        for t, r in zip(targets, results, strict=True):
            per_gpu.setdefault(t.gpu, []).append((t, r))
        yield from self._instance_families(targets, results)
        yield from self._gpu_families(per_gpu)
        node = _family("node_instances", "vLLM instances up on this node", ["node"])
        node.add_metric([self.node], float(sum(1 for r in results if r.up)))
        yield node

    def _instance_families(self, targets: list[Target], results: list[ScrapeResult]) -> list[GaugeMetricFamily]:
        gpu_proc = self.nvml.process_memory()
        g = _family
        up = g("instance_up", "1 when the vLLM instance answered /metrics", ["vllm_instance", "model"])
        dur = g("instance_scrape_duration_seconds", "Time to scrape the instance's /metrics", ["vllm_instance"])
        mem = g("instance_memory_bytes", "Memory of the instance by kind: weights and kv_cache (manifest, vLLM), "
                "process_gpu (NVML), process_rss (OS)", ["vllm_instance", "model", "kind"])
        pred = g("instance_predicted_memory_bytes", "Planner's bytes for one instance", ["vllm_instance", "model"])
        meas = g("instance_measured_memory_bytes", "Measured bytes of the instance: NVML per-process GPU memory "
                 "where present, else RSS", ["vllm_instance", "model", "source"])
        kvu = g("instance_kv_cache_usage_ratio", "Share of the KV cache in use (vLLM)", ["vllm_instance", "model"])
        run = g("instance_requests_running", "Requests running (vLLM)", ["vllm_instance", "model"])
        wait = g("instance_requests_waiting", "Requests waiting (vLLM)", ["vllm_instance", "model"])
        ratio = g("model_params_ratio", "Parameters kept by pruning (1 = not pruned)", ["model"])
        wratio = g("model_weight_bytes_ratio", "Weight bytes over the original's", ["model"])
        quant = g("model_info", "Served model: quantization scheme and kind", ["model", "quantization", "kind"])
        models_seen: set[str] = set()
        for t, r in zip(targets, results, strict=True):
            up.add_metric([t.name, t.model], 1.0 if r.up else 0.0)
            dur.add_metric([t.name], r.seconds)
            m = t.manifest
            if m is not None:
                mem.add_metric([t.name, t.model, "weights"], float(m.weight_bytes))
            if r.sample is not None:
                s = r.sample
                if s.kv_cache_bytes is not None:
                    mem.add_metric([t.name, t.model, "kv_cache"], float(s.kv_cache_bytes))
                for fam, value in ((kvu, s.kv_usage), (run, s.running), (wait, s.waiting)):
                    if value is not None:
                        fam.add_metric([t.name, t.model], float(value))
            if t.pid is not None:
                rss = process_tree_rss(t.pid)
                if rss is not None:
                    mem.add_metric([t.name, t.model, "process_rss"], float(rss))
                gpu_bytes = sum(v for p, v in gpu_proc.items() if p == t.pid or _is_descendant(p, t.pid))
                if gpu_bytes:
                    mem.add_metric([t.name, t.model, "process_gpu"], float(gpu_bytes))
                    meas.add_metric([t.name, t.model, "nvml"], float(gpu_bytes))
                elif rss is not None:
                    meas.add_metric([t.name, t.model, "rss"], float(rss))
            predicted = self.predicted_bytes(t)
            if predicted is not None:
                pred.add_metric([t.name, t.model], float(predicted))
            if t.model not in models_seen and m is not None:
                models_seen.add(t.model)
                ratio.add_metric([t.model], m.params_fraction)
                if m.weight_bytes_before:
                    wratio.add_metric([t.model], m.weight_bytes / m.weight_bytes_before)
                quant.add_metric([t.model, m.scheme, m.kind], 1.0)
        return [up, dur, mem, pred, meas, kvu, run, wait, ratio, wratio, quant]

    def _gpu_families(self, per_gpu: dict[str, list[tuple[Target, ScrapeResult]]]) -> list[GaugeMetricFamily]:
        g = _family
        res = g("gpu_instances", "vLLM instances resident on the GPU (co-location density)", ["gpu", "node"])
        used = g("gpu_memory_used_bytes", "Memory used on the GPU (NVML; host memory for cpu)", ["gpu", "node"])
        total = g("gpu_memory_total_bytes", "Memory of the GPU (NVML; host memory for cpu)", ["gpu", "node"])
        head = g("gpu_memory_headroom_bytes", "Total minus used", ["gpu", "node"])
        more = g("gpu_additional_instances", "More instances of this model that would fit (planner)",
                 ["gpu", "node", "model"])
        gpus = self.nvml.gpus()
        for gpu_id, members in sorted(per_gpu.items()):
            res.add_metric([gpu_id, self.node], float(sum(1 for _t, r in members if r.up)))
            if gpu_id in gpus:
                u, tot = gpus[gpu_id]
            elif gpu_id == "cpu":
                u, tot = self.host_memory()
            else:
                continue
            used.add_metric([gpu_id, self.node], float(u))
            total.add_metric([gpu_id, self.node], float(tot))
            head.add_metric([gpu_id, self.node], float(tot - u))
            for t in {t.model: t for t, _r in members}.values():
                per_instance = self.predicted_bytes(t)
                if per_instance:
                    more.add_metric([gpu_id, self.node, t.model], float(max(0, (tot - u) // per_instance)))
        return [res, used, total, head, more]


def _family(name: str, doc: str, labels: list[str], unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels, unit=unit)


def _is_descendant(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
        seen += 1
    return False


def _host_memory() -> tuple[int, int]:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"], info["MemTotal"]


def planner_for(max_model_len: int, concurrency: int, device: str = "cpu") -> Planner:
    """A ``predicted_bytes`` callable backed by the serving planner."""
    from serve_pruned.errors import ServePrunedError
    from serve_pruned.serving.memory import ModelFootprint, plan

    cache: dict[str, int | None] = {}

    def predicted(t: Target) -> int | None:
        if t.model_dir not in cache:
            try:
                fp = ModelFootprint.from_folder(t.model_dir)
                cache[t.model_dir] = plan(fp, device=device, max_model_len=max_model_len,
                                          concurrency=concurrency, instances=1).instance.total
            except (ServePrunedError, OSError, KeyError, ValueError):
                cache[t.model_dir] = None
        return cache[t.model_dir]

    return predicted
